"""Tool use in an eval's per-sample records: calls that ran, calls with the question's exact expression."""
import json, re, sys
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path)]
    n = len(rows)
    calls = ran = exact = correct = 0
    for r in rows:
        c = r["completion"]
        m = re.search(r'"expression": "([^"]*)"', c)
        if "<tool_call>" in c:
            calls += 1
        if re.search(r"\ntool\n(?!error)", c):
            ran += 1
        correct += bool(r["correct"])
    print(json.dumps({"file": path, "n": n, "accuracy": correct / n, "episodes_with_a_call": calls / n,
                      "calls_that_ran": ran / n}))
