"""House rules that are cheap to check mechanically."""

import ast

from conftest import REPO


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_library_never_imports_dvc():
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in (REPO / "featinv").rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in {"dvc", "dvclive"}
    ]
    assert offenders == []


def test_library_never_prints():
    offenders = []
    for path in (REPO / "featinv").rglob("*.py"):
        if path.name in {"cli.py", "console.py"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_stages_are_thin():
    for path in (REPO / "pipeline").glob("*.py"):
        assert len(path.read_text().splitlines()) < 70, f"{path.name} is not a thin stage"
