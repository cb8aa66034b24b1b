"""Every import path and file the docs name exists: the README, docs/ and the library's own docstring examples."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("dfm_prefect", "site_workers", "adapters", "flows")
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def _docs() -> dict[str, str]:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for package in ("dfm_prefect", "site_workers", "adapters"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            if module.__doc__:
                texts[info.name] = module.__doc__
    return texts


def _imports(text: str) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for block in FENCE.findall(text):
        lines = [line for line in block.splitlines() if re.match(r"\s*(from|import) ", line)]
        for node in ast.walk(ast.parse("\n".join(line.strip() for line in lines))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(OURS):
                found += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(alias.name, None) for alias in node.names if alias.name.startswith(OURS)]
    return found


DOCS = _docs()
IMPORTS = sorted({(where, module, name) for where, text in DOCS.items() for module, name in _imports(text)})


def test_the_docs_show_imports_of_ours():
    assert len(IMPORTS) > 20 and any(where == "README.md" for where, _, _ in IMPORTS)


@pytest.mark.parametrize("where, module, name", IMPORTS, ids=[f"{w}:{m}.{n}" for w, m, n in IMPORTS])
def test_an_import_the_docs_show_resolves(where, module, name):
    imported = importlib.import_module(module)
    if name is not None and not hasattr(imported, name):
        importlib.import_module(f"{module}.{name}")  # a submodule named in `from package import module`


def test_the_files_the_architecture_page_names_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:dfm_prefect|site_workers|adapters|flows)/[A-Za-z0-9_/.]*)`", text))
    assert len(named) > 10
    missing = [path for path in sorted(named) if not (ROOT / path).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
