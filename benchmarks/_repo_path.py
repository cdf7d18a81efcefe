"""Imported first by benchmark scripts run as `python benchmarks/NAME.py`: Python then puts this folder first on
sys.path, where benchmarks/rollout.py would shadow the `rollout` package and the repository root may be missing.
Importing this module puts the repository root there instead of this folder."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]
