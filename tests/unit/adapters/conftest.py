"""Fixtures of the adapter tests; builders live in adapter_testlib.py (a unique module name)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
