"""The import layers (rl/loop/__init__.py): contracts <- plug-in packages <- the loop.

Every import statement counts, the ones inside functions too: a lazy import still ties the layers.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ("rollout", "rewards", "trainers", "envs")
LOOP = ("rl.loop", "rl.swarm", "rl.cli")  # rl/swarm/ is a stage of the loop; rl/cli.py is the entry point


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def is_loop(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LOOP)


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def contract_files() -> list[Path]:
    return [p for p in files("rl") if p.relative_to(ROOT / "rl").parts[0] not in ("loop", "swarm", "cli.py")]


def test_plugin_packages_import_only_the_contracts_and_themselves():
    problems = [f"{p.relative_to(ROOT)} imports {m}" for pkg in PLUGINS for p in files(pkg)
                for m in sorted(imported_modules(p))
                if is_loop(m) or (m.split(".")[0] in PLUGINS and m.split(".")[0] != pkg)]
    assert not problems, "\n".join(problems)


def test_contracts_import_neither_plugins_nor_the_loop():
    problems = [f"{p.relative_to(ROOT)} imports {m}" for p in contract_files() for m in sorted(imported_modules(p))
                if is_loop(m) or m.split(".")[0] in PLUGINS]
    assert not problems, "\n".join(problems)


def test_the_layer_check_sees_the_code():
    assert len(contract_files()) >= 10 and all(files(pkg) for pkg in PLUGINS)
    assert "rl.loop.driver" in imported_modules(ROOT / "rl" / "cli.py")  # lazy imports are seen
