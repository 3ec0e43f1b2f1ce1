"""The floors: common/ (config, records, buffer client) imports no role and no driver module; actors/, rewards/ and
learner/ import only common/ and themselves; cluster/ (the driver) may import everything. Heavy dependencies have one
import site each."""
import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PARTS = ("actors", "rewards", "learner")


def imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_roles_meet_only_through_common():
    bad = []
    for part in PARTS:
        for path in (ROOT / part).rglob("*.py"):
            for name in imports(path):
                for other in (*PARTS, "cluster"):
                    if other != part and name.startswith(f"scratchpad.{other}"):
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_ground_floor_imports_no_role_and_no_driver():
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in (ROOT / "common").rglob("*.py") for name in imports(path)
           if name.startswith("scratchpad.") and not name.startswith("scratchpad.common")]
    assert not bad, bad


def test_one_import_site_per_heavy_dependency():
    sites = {"vllm": set(), "deepspeed": set(), "redis": set()}
    for folder in ("actors", "rewards", "learner", "cluster", "common"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in imports(path):
                top = name.split(".")[0]
                if top in sites:
                    sites[top].add(str(path.relative_to(ROOT)))
    assert sites["vllm"] == {"actors/engines.py"}
    assert sites["deepspeed"] == {"learner/engine.py"}
    assert sites["redis"] <= {"common/buffer.py"}
