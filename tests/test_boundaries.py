"""actors/, rewards/ and learner/ never import one another; heavy dependencies have one import site each."""
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


def test_parts_meet_only_through_cluster():
    bad = []
    for part in PARTS:
        for path in (ROOT / part).rglob("*.py"):
            for name in imports(path):
                for other in PARTS:
                    if other != part and name.startswith(f"scratchpad.{other}"):
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_one_import_site_per_heavy_dependency():
    sites = {"vllm": set(), "deepspeed": set(), "redis": set()}
    for folder in ("actors", "rewards", "learner", "cluster"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in imports(path):
                top = name.split(".")[0]
                if top in sites:
                    sites[top].add(str(path.relative_to(ROOT)))
    assert sites["vllm"] == {"actors/engines.py"}
    assert sites["deepspeed"] == {"learner/learner.py"}
    assert sites["redis"] <= {"cluster/buffer.py"}
