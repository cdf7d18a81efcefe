"""Imported first by benchmark scripts run as `python benchmarks/NAME.py`: Python then puts this folder first on
sys.path, where benchmarks/rollout.py would shadow the `rollout` package and the repository root may be missing.
Importing this module puts the repository root first and this folder last: last, not removed, because a process
that multiprocessing spawns from such a script (vLLM's engine core) re-runs the script and imports this module
again."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_OTHERS = [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, _HERE.parent)]
sys.path[:] = [str(_HERE.parent), *_OTHERS, str(_HERE)]
