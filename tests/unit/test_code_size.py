"""STYLE.md principle 1: modules under ~500 lines, functions under ~60, kept true by measurement."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rl", "rollout", "rewards", "trainers", "envs", "benchmarks")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def python_files():
    for package in PACKAGES:
        # Hidden folders are not ours (benchmarks/.trl-venv is a whole installed environment).
        yield from sorted(p for p in (ROOT / package).rglob("*.py")
                          if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def test_modules_and_functions_stay_small():
    problems = []
    for path in python_files():
        source = path.read_text()
        lines = source.count("\n")
        rel = path.relative_to(ROOT)
        if lines > MAX_MODULE_LINES:
            problems.append(f"{rel}: {lines} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{rel}:{node.lineno} {node.name}() is {length} lines (max {MAX_FUNCTION_LINES})")
    assert not problems, "\n".join(problems)


def test_the_size_check_sees_the_packages():
    assert len(list(python_files())) >= 10
