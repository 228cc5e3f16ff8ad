"""`yollava/` is pure PyTorch + transformers: no Ray, no S3, no HTTP, no pickle loads."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "boto3", "botocore", "fastapi", "starlette", "uvicorn", "httpx", "requests", "cluster",
             "serve", "pickle", "cloudpickle"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


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
