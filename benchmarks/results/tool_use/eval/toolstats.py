"""Tool use in `rl eval` per-sample records of tool episodes: episodes with a call, calls that ran without error.

The decoded transcript joins turns with the chat template's frame (`...\\ntool\\n<answer>\\nassistant\\n...`), so a
tool answer that is not `error: ...` is a call that ran.
"""

import json
import re
import sys
from pathlib import Path

for path in sys.argv[1:]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    n = len(rows)
    calls = sum("<tool_call>" in r["completion"] for r in rows)
    ran = sum(bool(re.search(r"\ntool\n(?!error)", r["completion"])) for r in rows)
    correct = sum(bool(r["correct"]) for r in rows)
    print(json.dumps({"file": path, "n": n, "accuracy": correct / n, "episodes_with_a_call": calls / n,
                      "calls_that_ran": ran / n}))
