"""`code_exec` in the OS sandbox (bubblewrap + seccomp, rl/sandbox.py) against today's code_exec (commit
fc3936c: one `python -I` process per completion for its assert tests, one per stdin/stdout case, sequential).

    python -m benchmarks.perf.code_exec_sandbox --out benchmarks/results/code_exec_sandbox/results.json
    python -m benchmarks.perf.code_exec_sandbox --smoke     # 4 completions, 1 repeat: checks the script runs

Workloads (built once from a fixed seed, written to one file every arm reads): A, 64 completions x 5 assert
tests; B, 64 completions x 5 stdin/stdout cases. Each completion is a markdown answer with a fenced Python block,
drawn from a few tasks in a mix of correct (~half), wrong (passes some tests) and raising (at definition or in a
test: scores 0) variants. No variant hangs: a time-out costs `timeout_s` in every arm alike and says nothing
about start-up.

Arms, each a fresh subprocess of this script (`--child`) that runs both workloads (alternating which first):
- `today`: rewards/ and rl/ of fc3936c, taken by `git archive fc3936c rewards rl` at run time into a temporary
  folder that comes first on PYTHONPATH (the child asserts it imported that code_exec); its per-sample
  `code_exec(prompt, completion, tests=...)` called once per completion, one after another, as the trainer did;
- `bwrap`: today's tree's batched `code_exec(prompts, completions, tests=[...])`, default workers (one per core);
- `bwrap_1worker`: the same with `workers=1` (the sandbox's cost without the parallelism);
- `python_only`: `sandbox: python_only` (no OS sandbox), default workers.
The timed span is the reward calls only (not the child's imports); for the new arms the job's preflight
(`require`: the one-off bwrap probe) runs before it and is reported apart (`preflight_s`). Arms run in
alternating order (A B C D, D C B A, ...), `--repeats` rounds; ratios to `today` are per round, reported as the
median and range over rounds. Every arm's per-completion totals are asserted equal to `today`'s on each workload
(same work or no comparison).

Start-up cost per call: `--calls` sequential `rl.sandbox.run_python("pass", ...)` under bwrap and under
python_only, against a bare `python -I -S -c pass` (the interpreter bwrap runs) and `python -I -c pass` (what
today's code_exec started per call: the venv's interpreter with site), in rounds of alternating order; median ms
per call. Every setting lives in `Settings`, once; the load average is recorded around every child.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from benchmarks._report import REPO, abba, emit, spread

if TYPE_CHECKING:  # not at run time: the `today` child's rewards/ (fc3936c) has no sandbox module
    from rl.sandbox import SandboxMode

ARMS = ("today", "bwrap", "bwrap_1worker", "python_only")
TODAY_COMMIT = "fc3936c"
WORKLOADS = ("A_asserts", "B_stdin_stdout")
STARTUP_KINDS = ("bwrap", "python_only", "bare_python_I_S", "bare_python_I")


@dataclasses.dataclass(frozen=True)
class Settings:
    completions: int = 64
    """Completions per workload."""
    tests: int = 5
    """Tests per completion (assert strings in A, stdin/stdout cases in B)."""
    repeats: int = 5
    """Rounds of all arms, in alternating order."""
    seed: int = 0
    """Seed of the variant mix (which completion is correct, wrong or raising)."""
    timeout_s: float = 5.0
    """code_exec's `timeout_s` (its default), every arm."""
    memory_mb: int = 512
    """code_exec's `memory_mb` (its default), every arm."""
    workers_default: int = os.cpu_count() or 1
    """What `workers: null` resolves to in the new code_exec (one per core)."""
    startup_calls: int = 50
    """Sequential calls per kind and round in the start-up measurement."""
    startup_rounds: int = 3
    child_timeout_s: float = 1200.0


# ----- the workloads (identical in every arm) -----------------------------------------------------------------
# Each task: its tests and variants {"correct"|"wrong"|"raises": code}. Tests of A are assert strings; of B,
# (stdin, expected stdout) pairs.
ASSERT_TASKS: list[dict[str, Any]] = [
    {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0, 0) == 0",
               "assert add(10, 5) == 15", "assert add(-3, -4) == -7"],
     "correct": "def add(a, b):\n    return a + b\n",
     "wrong": "def add(a, b):\n    return a - b\n",
     "raises": "def add(a, b):\n    return a + c\n"},
    {"tests": ["assert factorial(0) == 1", "assert factorial(1) == 1", "assert factorial(5) == 120",
               "assert factorial(3) == 6", "assert factorial(6) == 720"],
     "correct": "import math\n\ndef factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n"
                "        result *= k\n    return result\n",
     "wrong": "def factorial(n):\n    result = 1\n    for k in range(1, n):\n        result *= k\n    return result\n",
     "raises": "import numpyy as np\n\ndef factorial(n):\n    return int(np.prod(range(1, n + 1)))\n"},
    {"tests": ["assert is_prime(2)", "assert not is_prime(15)", "assert is_prime(17)", "assert not is_prime(1)",
               "assert is_prime(97)"],
     "correct": "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
                "        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
     "wrong": "def is_prime(n):\n    return n % 2 == 1\n",
     "raises": "def is_prime(n):\n    return all(n % d for d in range(0, n))\n"},
    {"tests": ["assert reverse_words('a b c') == 'c b a'", "assert reverse_words('hello') == 'hello'",
               "assert reverse_words('') == ''", "assert reverse_words('one two') == 'two one'",
               "assert reverse_words('x  y') == 'y x'"],
     "correct": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
     "wrong": "def reverse_words(s):\n    return s[::-1]\n",
     "raises": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n\nprint(reverse_words(None))\n"},
    {"tests": ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55", "assert fib(20) == 6765",
               "assert fib(2) == 1"],
     "correct": "from functools import lru_cache\n\n@lru_cache(maxsize=None)\ndef fib(n):\n"
                "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
     "wrong": "def fib(n):\n    a, b = 1, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "raises": "def fib(n):\n    return fib(n - 1) + fib(n - 2)\n"},
    {"tests": ["assert count_vowels('hello') == 2", "assert count_vowels('xyz') == 0",
               "assert count_vowels('AEIOU') == 5", "assert count_vowels('') == 0",
               "assert count_vowels('Programming') == 3"],
     "correct": "import re\n\ndef count_vowels(s):\n    return len(re.findall('[aeiou]', s, re.IGNORECASE))\n",
     "wrong": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n",
     "raises": "def count_vowels(s):\n    return s.count_vowels()\n"},
    {"tests": ["assert flatten([1, [2, 3]]) == [1, 2, 3]", "assert flatten([]) == []",
               "assert flatten([[1], [2, [3, [4]]]]) == [1, 2, 3, 4]", "assert flatten([5]) == [5]",
               "assert flatten([[], [[]]]) == []"],
     "correct": "def flatten(xs):\n    out = []\n    for x in xs:\n        if isinstance(x, list):\n"
                "            out.extend(flatten(x))\n        else:\n            out.append(x)\n    return out\n",
     "wrong": "import itertools\n\ndef flatten(xs):\n    return list(itertools.chain.from_iterable(\n"
              "        x if isinstance(x, list) else [x] for x in xs))\n",
     "raises": "def flatten(xs):\n    return sum(xs, [])\n"},
    {"tests": ["assert gcd(12, 18) == 6", "assert gcd(7, 5) == 1", "assert gcd(0, 9) == 9", "assert gcd(100, 10) == 10",
               "assert gcd(21, 14) == 7"],
     "correct": "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
     "wrong": "def gcd(a, b):\n    return min(a, b)\n",
     "raises": "from collections import Counter\n\ndef gcd(a, b):\n    return math.gcd(a, b)\n"},
]

IO_TASKS: list[dict[str, Any]] = [
    {"tests": [("2 3\n", "5"), ("10 -4\n", "6"), ("0 0\n", "0"), ("2 2\n", "4"), ("100 250\n", "350")],
     "correct": "a, b = map(int, input().split())\nprint(a + b)\n",
     "wrong": "a, b = map(int, input().split())\nprint(a * b)\n",
     "raises": "n = int(input())\nprint(n)\n"},
    {"tests": [("3\n1 5 2\n", "5"), ("1\n-7\n", "-7"), ("4\n4 4 4 4\n", "4"), ("5\n9 1 8 2 7\n", "9"),
               ("2\n-1 -2\n", "-1")],
     "correct": "import sys\n\ndef main():\n    data = sys.stdin.read().split()\n    n = int(data[0])\n"
                "    print(max(map(int, data[1:n + 1])))\n\nif __name__ == '__main__':\n    main()\n",
     "wrong": "n = int(input())\nxs = list(map(int, input().split()))\nprint(xs[-1])\n",
     "raises": "n = int(input())\nxs = list(map(int, input().split()))\nprint(xs[n])\n"},
    {"tests": [("hello\n", "OLLEH"), ("abc\n", "CBA"), ("a\n", "A"), ("racecar\n", "RACECAR"), ("Xy z\n", "Z YX")],
     "correct": "s = input()\nprint(s[::-1].upper())\n",
     "wrong": "s = input()\nprint(s.upper())\n",
     "raises": "s = input()\nprint(s[::-1].upper() + 1)\n"},
    {"tests": [("1\n", "1"), ("10\n", "55"), ("100\n", "5050"), ("0\n", "0"), ("3\n", "6")],
     "correct": "import sys\nn = int(sys.stdin.readline())\nprint(n * (n + 1) // 2)\n",
     "wrong": "import sys\nn = int(sys.stdin.readline())\nprint(n * (n - 1) // 2)\n",
     "raises": "import sys\nn = int(sys.stdin.readline())\nprint(sum(range(n + 1)) // (n - n))\n"},
    {"tests": [("a b\nc\n", "3"), ("\n", "0"), ("one\n", "1"), ("x y z w\n", "4"), ("  spaced   out  \n", "2")],
     "correct": "import sys\nprint(len(sys.stdin.read().split()))\n",
     "wrong": "import sys\nprint(len(sys.stdin.read().split(' ')))\n",
     "raises": "import sys\nwords = sys.stdin.read().split()\nprint(len(words[0]) // 0)\n"},
    {"tests": [("10\n", "4"), ("2\n", "1"), ("1\n", "0"), ("100\n", "25"), ("1000\n", "168")],
     "correct": "n = int(input())\nsieve = [True] * (n + 1)\nsieve[:2] = [False] * min(2, n + 1)\n"
                "for i in range(2, int(n ** 0.5) + 1):\n    if sieve[i]:\n"
                "        sieve[i * i::i] = [False] * len(sieve[i * i::i])\nprint(sum(sieve))\n",
     "wrong": "n = int(input())\nprint(sum(1 for k in range(2, n) if all(k % d for d in range(2, k))))\n",
     "raises": "import math\nn = int(input())\nprint(math.isqrt(-n))\n"},
]

VARIANT_WEIGHTS = {"correct": 0.5, "wrong": 0.35, "raises": 0.15}


def _completion(task_index: int, code: str) -> str:
    """A markdown answer with the code in a fenced block, as a model writes it."""
    return (f"Here is my solution to problem {task_index}.\n\n```python\n{code}```\n\n"
            "It handles the edge cases described above.")


def workload(tasks: list[dict[str, Any]], kind: str, s: Settings, rng: random.Random) -> list[dict[str, Any]]:
    """`s.completions` samples over `tasks` in turn; the variants in VARIANT_WEIGHTS' proportions, shuffled."""
    variants = [v for v, w in VARIANT_WEIGHTS.items() for _ in range(round(w * s.completions))]
    variants = (variants + ["correct"] * s.completions)[: s.completions]  # rounding: fill up with correct ones
    rng.shuffle(variants)
    items = []
    for i, variant in enumerate(variants):
        task = tasks[i % len(tasks)]
        raw = task["tests"][: s.tests]
        tests = list(raw) if kind == "asserts" else [{"input": a, "output": b} for a, b in raw]
        items.append({"prompt": f"Problem {i % len(tasks)}", "completion": _completion(i % len(tasks), task[variant]),
                      "tests": tests, "variant": variant})
    return items


def workloads(s: Settings) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(s.seed)
    return {"A_asserts": workload(ASSERT_TASKS, "asserts", s, rng), "B_stdin_stdout": workload(IO_TASKS, "io", s, rng)}


# ----- the child: one arm, both workloads ---------------------------------------------------------------------
def _totals(results: object) -> list[float | None]:
    """Each completion's RewardOutput (or None) -> its total."""
    return [None if r is None else float(r.total) for r in cast("list[Any]", results)]


def _today(items: list[dict[str, Any]], s: Settings) -> list[float | None]:
    # imported by name: which code_exec this is (fc3936c's, per sample) is decided by PYTHONPATH at run time
    old = importlib.import_module("rewards.code_exec")
    return _totals([old.code_exec(it["prompt"], it["completion"], tests=it["tests"], timeout_s=s.timeout_s,
                                  memory_mb=s.memory_mb) for it in items])


def _batched(workers: int | None, sandbox: str) -> Callable[[list[dict[str, Any]], Settings], list[float | None]]:
    def run(items: list[dict[str, Any]], s: Settings) -> list[float | None]:
        from rewards.code_exec import code_exec

        results = code_exec([it["prompt"] for it in items], [it["completion"] for it in items],
                            tests=[it["tests"] for it in items], timeout_s=s.timeout_s, memory_mb=s.memory_mb,
                            sandbox=sandbox, workers=workers)
        return _totals(results)
    return run


ARM_RUNS: dict[str, Callable[[list[dict[str, Any]], Settings], list[float | None]]] = {
    "today": _today, "bwrap": _batched(None, "bwrap"), "bwrap_1worker": _batched(1, "bwrap"),
    "python_only": _batched(None, "python_only"),
}
ARM_SANDBOX: dict[str, SandboxMode] = {"bwrap": "bwrap", "bwrap_1worker": "bwrap", "python_only": "python_only"}


def child(arm: str, spec_path: str, order: Sequence[str]) -> dict[str, Any]:
    spec = json.loads(Path(spec_path).read_text())
    s = Settings(**spec["settings"])
    import rewards.code_exec

    source = str(Path(rewards.code_exec.__file__).resolve())
    expected_root = spec["today_root"] if arm == "today" else str(REPO)
    assert source.startswith(str(Path(expected_root).resolve()) + os.sep), f"{arm} imported {source}"
    preflight_s = 0.0
    if arm in ARM_SANDBOX:  # what the job does when its rewards are built: the one-off bwrap probe
        from rl.sandbox import require

        start = time.perf_counter()
        require(ARM_SANDBOX[arm])
        preflight_s = time.perf_counter() - start
    out: dict[str, Any] = {"arm": arm, "code_exec_file": source, "preflight_s": preflight_s, "workloads": {}}
    for name in order:
        # wall time only: CPU time is not comparable, since the processes inside bwrap's PID namespace are
        # not reaped by this process and never show in its children's rusage (os.times reads 0 for them)
        start = time.perf_counter()
        totals = ARM_RUNS[arm](spec["workloads"][name], s)
        out["workloads"][name] = {"seconds": time.perf_counter() - start, "totals": totals}
    return out


# ----- start-up cost per call ---------------------------------------------------------------------------------
def startup_child(s: Settings) -> dict[str, Any]:
    from rl.sandbox import Limits, interpreter, require, run_python

    limits = Limits(timeout_s=s.timeout_s, memory_mb=s.memory_mb)
    for mode in ("bwrap", "python_only"):
        require(mode)

    def bare(argv: list[str]) -> Callable[[], object]:
        return lambda: subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, check=True)

    calls: dict[str, Callable[[], object]] = {
        "bwrap": lambda: run_python("pass", (), {}, "", limits, "bwrap"),
        "python_only": lambda: run_python("pass", (), {}, "", limits, "python_only"),
        "bare_python_I_S": bare([interpreter(), "-I", "-S", "-c", "pass"]),
        "bare_python_I": bare([sys.executable, "-I", "-c", "pass"]),
    }
    ms: dict[str, list[float]] = {k: [] for k in STARTUP_KINDS}
    round_medians: dict[str, list[float]] = {k: [] for k in STARTUP_KINDS}
    for kind in abba(STARTUP_KINDS, s.startup_rounds):
        times = []
        for _ in range(s.startup_calls):
            start = time.perf_counter()
            calls[kind]()
            times.append((time.perf_counter() - start) * 1e3)
        ms[kind] += times
        round_medians[kind].append(statistics.median(times))
    return {"median_ms_per_call": {k: statistics.median(v) for k, v in ms.items()},
            "per_round_median_ms": {k: spread(v) for k, v in round_medians.items()},
            "calls_per_kind": {k: len(v) for k, v in ms.items()},
            "interpreters": {"bwrap": interpreter(), "python_only": sys.executable,
                             "bare_python_I_S": interpreter(), "bare_python_I": sys.executable}}


# ----- the parent ---------------------------------------------------------------------------------------------
def _spawn(args: list[str], pythonpath: str, cwd: str, s: Settings) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    load_before = list(os.getloadavg())
    done = subprocess.run([sys.executable, "-m", __spec__.name, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False, timeout=s.child_timeout_s)
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load_before,
            "load_after": list(os.getloadavg())}


def _today_tree(dest: str) -> None:
    """rewards/ and rl/ as they were at TODAY_COMMIT (before the OS sandbox)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", TODAY_COMMIT, "rewards", "rl"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def run(s: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="code-exec-bench-") as tmp:
        today_root, cwd = Path(tmp, "today"), Path(tmp, "cwd")  # an empty cwd: nothing imports from it
        today_root.mkdir()
        cwd.mkdir()
        _today_tree(str(today_root))
        spec_path = Path(tmp, "spec.json")
        loads = workloads(s)
        spec_path.write_text(json.dumps({"settings": dataclasses.asdict(s), "workloads": loads,
                                         "today_root": str(today_root)}))
        # the harness (this module) is found after the code under test: `rewards` comes from the first entry
        paths = {arm: os.pathsep.join([str(today_root) if arm == "today" else str(REPO), str(REPO)]) for arm in ARMS}
        startup = _spawn(["--startup", str(spec_path)], str(REPO), str(cwd), s)
        rows: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        for i, arm in enumerate(abba(ARMS, s.repeats)):
            order = WORKLOADS if (i // len(ARMS)) % 2 == 0 else tuple(reversed(WORKLOADS))
            rows[arm].append(_spawn(["--child", arm, str(spec_path), ",".join(order)], paths[arm], str(cwd), s))
    return summarise(s, loads, rows, startup)


def summarise(s: Settings, loads: dict[str, list[dict[str, Any]]], rows: dict[str, list[dict[str, Any]]],
              startup: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name in WORKLOADS:
        reference = rows["today"][0]["workloads"][name]["totals"]
        for arm, runs in rows.items():  # same work or no comparison
            for r in runs:
                got = r["workloads"][name]["totals"]
                assert got == reference, f"{name}: {arm} scored {got}, today {reference}"
        n_tests = s.completions * s.tests
        per_arm = {}
        for arm, runs in rows.items():
            secs = [r["workloads"][name]["seconds"] for r in runs]
            per_arm[arm] = {"seconds": spread(secs), "s_per_completion": spread([x / s.completions for x in secs]),
                            "ms_per_test": spread([1e3 * x / n_tests for x in secs])}
            if arm != "today":
                per_arm[arm]["ratio_to_today"] = spread([a["workloads"][name]["seconds"] / t["workloads"][name]
                                                         ["seconds"] for a, t in zip(runs, rows["today"])])
        ratio = per_arm["bwrap"]["ratio_to_today"]["median"]
        # interpreter starts per workload, by each code_exec's design (not counted at run time): fc3936c starts
        # one per completion for its asserts and one per stdin/stdout case; the new one, one per completion
        starts = s.completions if name == "A_asserts" else s.completions * s.tests
        figures[name] = {"arms": per_arm, "goal_bwrap_at_most_2x_today": ratio <= 2.0,
                         "interpreter_starts": {arm: starts if arm == "today" else s.completions for arm in ARMS},
                         "mean_total": statistics.fmean(x for x in reference if x is not None),
                         "variants": {v: sum(it["variant"] == v for it in loads[name]) for v in VARIANT_WEIGHTS}}
    return {
        "benchmark": "code_exec_sandbox", "today_commit": TODAY_COMMIT,
        "settings": {**dataclasses.asdict(s), "arms": {"today": "fc3936c code_exec, per completion, sequential",
                                                      "bwrap": f"workers=None ({s.workers_default}), sandbox=bwrap",
                                                      "bwrap_1worker": "workers=1, sandbox=bwrap",
                                                      "python_only": f"workers=None ({s.workers_default}), "
                                                                     "sandbox=python_only"}},
        "workloads": figures, "startup_per_call": startup,
        "preflight_s": {arm: spread([r["preflight_s"] for r in runs]) for arm, runs in rows.items() if arm != "today"},
        "rows": rows,
        "load_avg_at_end": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="4 completions, 1 repeat, 5 start-up calls: seconds")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of all arms (default 5)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "SPEC", "ORDER"), help=argparse.SUPPRESS)
    parser.add_argument("--startup", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arm, spec, order = args.child
        print(json.dumps(child(arm, spec, order.split(","))))
        return
    if args.startup:
        print(json.dumps(startup_child(Settings(**json.loads(Path(args.startup).read_text())["settings"]))))
        return
    s = Settings(completions=4, repeats=1, startup_calls=5, startup_rounds=1) if args.smoke else Settings()
    if args.repeats is not None:
        s = dataclasses.replace(s, repeats=args.repeats)
    emit(run(s), args.out)


if __name__ == "__main__":
    main()
