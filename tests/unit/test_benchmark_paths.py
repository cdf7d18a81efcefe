"""benchmarks/_repo_path.py: what a script in benchmarks/ imports first so that `rollout` is the package, not
benchmarks/rollout.py, and that a process multiprocessing spawns from the script (vLLM's engine core re-runs
it) can import the shim again."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.machinery, sys
sys.path.insert(0, {bench!r})  # what `python benchmarks/NAME.py` does
import _repo_path
import rollout
print(rollout.__file__)
print(importlib.machinery.PathFinder.find_spec("_repo_path") is not None)  # on sys.path, not the cache
print(sys.path[0])
"""


def test_shim_puts_the_packages_first_and_stays_importable_for_spawned_children():
    out = subprocess.run([sys.executable, "-c", PROBE.format(bench=str(ROOT / "benchmarks"))], cwd="/",
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert Path(out[0]) == ROOT / "rollout" / "__init__.py"
    assert out[1] == "True"  # the old shim removed benchmarks/ and a spawned vLLM engine core failed to start
    assert Path(out[2]) == ROOT
