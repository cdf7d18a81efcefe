"""`code_exec`: run the completion's code against test cases in the OS sandbox (rl/sandbox.py).

Tests (the sample's `tests` field, or the `tests` kwarg) are either strings of Python run after the
candidate's code (e.g. `"assert add(2, 3) == 5"`), or `{"input": stdin, "output": expected stdout}` pairs.
The reward is the fraction of tests passed (None when the sample has no tests).

One sandbox start per completion and kind of test, not per test (a start costs tens of milliseconds): all
assert tests run after one execution of the code, in its namespace; all stdin/stdout cases run one after
another in one process, each with a fresh `__main__` namespace, its stdin and stdout redirected at the file
descriptor level, and its own `timeout_s` (the standard library's modules stay imported between cases).
Each test's result is reported as it finishes, so a test that hangs costs only itself and the ones after
it. Expected outputs never enter the sandbox: the trainer compares them. Completions of a batch run
`workers` at a time (default: one per CPU core).

Settings (the reward's kwargs): `timeout_s` (per test; 5), `memory_mb` (address space; 512), `workers`,
`sandbox` (`bwrap`, the default, or `python_only`: see rl/sandbox.py; without an OS sandbox the job
refuses to start unless it says `python_only`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from rewards import RewardOutput, batched_reward
from rl.registries import REWARDS
from rl.sandbox import Limits, Run, SandboxMode, limits_prelude, require, run_python

ROOT = str(Path(__file__).resolve().parents[1])
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
STARTUP_S = 5.0  # interpreter start-up inside the sandbox, on top of the tests' own time
GUARD = """\
sys.path.insert(0, {root!r})
from rewards.guard import trusted_code_guard
del sys.path[0]
sys.addaudithook(trusted_code_guard(os.getcwd()))
"""
RUNNER = """\
import json, os, signal, sys
spec = json.load(open("spec.json"))
os.remove("spec.json")  # the nonce then lives only in this process, not in a file or the command line
nonce, per_test_s = spec["nonce"], spec["per_test_s"]
report = os.fdopen(os.dup(1), "w")  # the real stdout, kept before a case redirects fd 1
def done(k, ok):
    report.write("\\n%s %d %d\\n" % (nonce, k, ok))
    report.flush()
class TestTimeout(BaseException):
    pass
def alarm(signum, frame):
    raise TestTimeout()
signal.signal(signal.SIGALRM, alarm)
source = open("solution.py").read()
{limits}{guard}
def asserts(tests):
    namespace = {{"__name__": "__main__"}}
    exec(compile(source, "solution.py", "exec"), namespace)  # raising here: nothing passes
    for k, test in enumerate(tests):
        try:
            exec(compile(test, "test", "exec"), namespace)
            ok = 1
        except Exception:
            ok = 0
        done(k, ok)
def redirect(fd, path, flags):
    new = os.open(path, flags, 0o600)
    os.dup2(new, fd)
    os.close(new)
def io_cases(inputs):
    code = compile(source, "solution.py", "exec")
    for k, text in enumerate(inputs):
        with open("stdin.txt", "w") as f:
            f.write(text)
        redirect(0, "stdin.txt", os.O_RDONLY)
        redirect(1, "out%d" % k, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        sys.stdin, sys.stdout = open(0, closefd=False), open(1, "w", closefd=False)
        ok = 1
        signal.setitimer(signal.ITIMER_REAL, per_test_s)
        try:
            exec(code, {{"__name__": "__main__"}})
        except SystemExit as exit:
            ok = int(exit.code in (None, 0))
        except BaseException:
            ok = 0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                sys.stdout.flush()
            except BaseException:
                ok = 0
        done(k, ok)
asserts(spec["tests"]) if spec["mode"] == "asserts" else io_cases(spec["inputs"])
"""


def extract_code(completion: str) -> str:
    """The last fenced Python block, or the whole completion when there is none."""
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def _reported(stdout: str, nonce: str) -> dict[int, bool]:
    """{test index: passed} from the runner's report lines (the nonce keeps the candidate's prints out)."""
    results: dict[int, bool] = {}
    for line in stdout.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit() and parts[2] in ("0", "1"):
            results.setdefault(int(parts[1]), parts[2] == "1")
    return results


def _runner(limits: Limits, mode: SandboxMode) -> str:
    guard = GUARD.format(root=ROOT) if mode == "python_only" else ""
    return RUNNER.format(limits=limits_prelude(limits), guard=guard)


def _execute(code: str, spec: dict[str, object], n: int, per_test_s: float, memory_mb: int,
             mode: SandboxMode, collect: Sequence[str] = ()) -> tuple[dict[int, bool], Run]:
    nonce = secrets.token_hex(8)
    limits = Limits(timeout_s=per_test_s * max(n, 1) + STARTUP_S, memory_mb=memory_mb)
    files = {"solution.py": code, "spec.json": json.dumps({**spec, "nonce": nonce, "per_test_s": per_test_s})}
    run = run_python(_runner(limits, mode), (), files, "", limits, mode, collect)
    return _reported(run.stdout, nonce), run


def _asserts_passed(code: str, tests: Sequence[str], timeout_s: float, memory_mb: int,
                    mode: SandboxMode) -> tuple[int, bool]:
    """(tests passed, whether the sandbox killed the code for a forbidden call)."""
    # the asserts share one time budget (as one script), so the whole run gets timeout_s, not n of them
    results, run = _execute(code, {"mode": "asserts", "tests": list(tests)}, 1, timeout_s, memory_mb, mode)
    return sum(results.values()), run.blocked


def _io_passed(code: str, cases: Sequence[Mapping[str, object]], timeout_s: float, memory_mb: int,
               mode: SandboxMode) -> tuple[int, bool]:
    inputs = [str(c.get("input", "")) for c in cases]
    outs = [f"out{k}" for k in range(len(cases))]
    results, run = _execute(code, {"mode": "io", "inputs": inputs}, len(cases), timeout_s, memory_mb, mode, outs)
    passed = sum(results.get(k, False) and run.files.get(outs[k], b"").decode("utf-8", "replace").strip()
                 == str(case.get("output", "")).strip() for k, case in enumerate(cases))
    return passed, run.blocked


def score_code(completion: str, tests: Sequence[str | Mapping[str, object]] | None = None, timeout_s: float = 5.0,
               memory_mb: int = 512, sandbox: SandboxMode = "bwrap") -> RewardOutput | None:
    """Fraction of `tests` one completion's code passes (see the module doc)."""
    if not tests:
        return None
    code = extract_code(completion)
    asserts = [t for t in tests if isinstance(t, str)]
    io_cases = [t for t in tests if isinstance(t, Mapping)]
    runs = [(_asserts_passed(code, asserts, timeout_s, memory_mb, sandbox) if asserts else (0, False)),
            (_io_passed(code, io_cases, timeout_s, memory_mb, sandbox) if io_cases else (0, False))]
    passed, blocked = sum(p for p, _ in runs), any(b for _, b in runs)
    # `blocked`: the code tried a forbidden call (a process, a socket, a signal...) and was killed: logged as
    # reward/<label>/blocked/mean, so a policy learning to probe the sandbox shows in the metrics
    return RewardOutput(total=passed / len(tests), components={"passed": float(passed), "blocked": float(blocked)})


def _column(value: object, n: int) -> list[object]:
    """A batched reward gets each field as a list; a kwarg that was not merged per sample is one value."""
    return list(value) if isinstance(value, list) and len(value) == n else [value] * n


@REWARDS.register("code_exec")
@batched_reward
def code_exec(prompts: Sequence[str], completions: Sequence[str], tests: object = None, timeout_s: object = 5.0,
              memory_mb: object = 512, sandbox: object = "bwrap", workers: object = None,
              **fields: object) -> list[RewardOutput | None]:
    """Each completion's fraction of its `tests` passed, `workers` sandboxes at a time (see the module doc)."""
    n = len(completions)
    columns = [_column(v, n) for v in (tests, timeout_s, memory_mb, sandbox)]
    width = _column(workers, n)[0] if n else None
    pool_size = int(cast(int, width)) if width else (os.cpu_count() or 1)
    for mode in set(columns[3]):
        require(cast(SandboxMode, mode))  # before any start: a clear refusal, not n failed calls

    def one(i: int) -> RewardOutput | None:
        t, limit, mem, mode = (c[i] for c in columns)
        return score_code(completions[i], cast("Sequence[str | Mapping[str, object]] | None", t),
                          float(cast(float, limit)), int(cast(int, mem)), cast(SandboxMode, mode))

    with ThreadPoolExecutor(max(1, min(pool_size, n))) as pool:
        return list(pool.map(one, range(n)))


def preflight(kwargs: Mapping[str, object]) -> None:
    """Checked when a job's rewards are built: the sandbox it asks for can run here."""
    require(cast(SandboxMode, kwargs.get("sandbox", "bwrap")))


code_exec.preflight = preflight  # type: ignore[attr-defined]
