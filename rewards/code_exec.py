"""`code_exec`: run the completion's code against test cases in a sandboxed subprocess.

The candidate runs in a separate isolated interpreter (`python -I`: no user site, no PYTHON* variables,
no cwd on sys.path) in a fresh empty temporary directory (its cwd, HOME and TMPDIR, deleted afterwards),
with a minimal environment, OS limits on CPU time, address space, file size and open files, its own
process group (killed as a whole at the time limit), and the reward sandbox's audit hook (no sockets,
no writes outside its directory, no new processes; see rewards/isolation.py). It cannot reach the
trainer's memory or files through Python; for hostile code at scale add a container around the trainer.

Tests (the sample's `tests` field, or the `tests` kwarg) are either strings of Python run after the
candidate's code (e.g. `"assert add(2, 3) == 5"`), or `{"input": stdin, "output": expected stdout}` pairs.
The reward is the fraction of tests passed (None when the sample has no tests).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from rewards import RewardOutput
from rl.registries import REWARDS

ROOT = str(Path(__file__).resolve().parents[1])
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
RUNNER = """\
import json, os, resource, sys
nonce, mode, memory_mb, cpu_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
del sys.argv[1:]
sys.path.insert(0, {root!r})
from rewards.isolation import make_audit_hook
del sys.path[0]
for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu_s),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64)):
    resource.setrlimit(limit, (value, value))
tests = json.load(open("tests.json")) if mode == "asserts" else []
source = open("solution.py").read()
sys.addaudithook(make_audit_hook(os.getcwd()))
namespace = {{"__name__": "__main__"}}
exec(compile(source, "solution.py", "exec"), namespace)
passed = 0
for test in tests:
    try:
        exec(compile(test, "test", "exec"), namespace)
        passed += 1
    except Exception:
        pass
print("\\n" + nonce + json.dumps(passed), flush=True)
"""


def extract_code(completion: str) -> str:
    """The last fenced Python block, or the whole completion when there is none."""
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def _run(code: str, mode: str, stdin: str, tests: Sequence[str], timeout_s: float, memory_mb: int) -> str | None:
    """The runner's stdout, or None when it timed out."""
    with tempfile.TemporaryDirectory(prefix="rlpost-code-") as tmp:
        Path(tmp, "solution.py").write_text(code)
        Path(tmp, "tests.json").write_text(json.dumps(list(tests)))
        nonce = secrets.token_hex(8)
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        cmd = [sys.executable, "-I", "-c", RUNNER.format(root=ROOT), nonce, mode, str(memory_mb),
               str(max(1, int(timeout_s + 1)))]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the candidate may have started children
            proc.communicate()
            return None
        return out.replace("\n" + nonce, "\n" + "\0", 1) if nonce in out else out


def _asserts_passed(code: str, tests: Sequence[str], timeout_s: float, memory_mb: int) -> int:
    out = _run(code, "asserts", "", tests, timeout_s, memory_mb)
    if out is None or "\0" not in out:  # timed out or crashed before reporting: nothing passed
        return 0
    return int(out.rpartition("\0")[2].strip() or 0)


def _io_passed(code: str, test: Mapping[str, object], timeout_s: float, memory_mb: int) -> bool:
    out = _run(code, "io", str(test.get("input", "")), (), timeout_s, memory_mb)
    if out is None or "\0" not in out:
        return False
    return out.partition("\0")[0].strip() == str(test.get("output", "")).strip()


@REWARDS.register("code_exec")
def code_exec(prompt: str, completion: str, tests: Sequence[str | Mapping[str, object]] | None = None,
              timeout_s: float = 5.0, memory_mb: int = 512, **fields: object) -> RewardOutput | None:
    """Fraction of `tests` the completion's code passes, run in a sandboxed subprocess (see module doc)."""
    if not tests:
        return None
    code = extract_code(completion)
    asserts = [t for t in tests if isinstance(t, str)]
    io_cases = [t for t in tests if isinstance(t, Mapping)]
    passed = _asserts_passed(code, asserts, timeout_s, memory_mb) if asserts else 0
    passed += sum(_io_passed(code, t, timeout_s, memory_mb) for t in io_cases)
    return RewardOutput(total=passed / len(tests), components={"passed": float(passed)})
