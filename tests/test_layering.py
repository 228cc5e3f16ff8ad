"""Dependencies point one way: `serve` -> `cluster` -> `yollava`, and `miniworld` -> `yollava`.

`yollava/` is pure PyTorch + transformers: no Ray, no S3, no HTTP, no pickle
loads, nothing of the miniature world; no package's modules import each other
in a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "boto3", "botocore", "fastapi", "starlette", "uvicorn", "httpx", "requests", "cluster",
             "serve", "miniworld", "pickle", "cloudpickle"}
PACKAGES = ("yollava", "cluster", "serve", "miniworld")


def imported_names(path: Path) -> set[str]:
    """Every absolute module name a file imports, anywhere in it (functions included)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def imported_modules(path: Path) -> set[str]:
    return {n.split(".")[0] for n in imported_names(path)}


def module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {mod: {n for n in imported_names(path) if n in files and n != mod} for mod, path in files.items()}


@pytest.mark.parametrize("path", sorted((ROOT / "yollava").rglob("*.py")), ids=lambda p: p.name)
def test_yollava_imports_nothing_distributed(path):
    assert not imported_modules(path) & FORBIDDEN


def test_no_unsafe_torch_load():
    for path in list((ROOT / "yollava").rglob("*.py")) + list((ROOT / "cluster").rglob("*.py")) + \
            list((ROOT / "serve").rglob("*.py")):
        text = path.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_miniworld_depends_on_the_core_never_the_reverse():
    assert not any(imported_modules(p) & {"miniworld"} for p in (ROOT / "yollava").rglob("*.py"))
    assert any("yollava" in imported_modules(p) for p in (ROOT / "miniworld").rglob("*.py"))


def test_serve_never_imports_miniworld():
    """The chat service (and its demo) read the sample files, not the world's code."""
    assert not any("miniworld" in imported_modules(p) for p in (ROOT / "serve").rglob("*.py"))


def test_cluster_never_imports_serve():
    """The batch side runs without the chat service: `serve` depends on `cluster`, never the reverse."""
    files = sorted((ROOT / "cluster").rglob("*.py"))
    assert len(files) > 5, files  # the walk found the package
    assert [p.name for p in files if "serve" in imported_modules(p)] == []


def test_no_import_cycle():
    graph = module_graph()
    assert len(graph) > 30, sorted(graph)  # the walk found the project
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [mod, dep]))
            if dep not in state:
                visit(dep, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
