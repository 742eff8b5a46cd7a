"""Architecture rules of STYLE.md that a machine can check: file size and import direction."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cellvi"
MAX_LINES = 500

# Lower rank may never import a higher one; equal ranks of different subpackages are
# independent of each other. Top-level modules (_settings, errors, _constants) are rank 0.
RANK = {
    "data": 1,
    "dataloaders": 2,
    "distributions": 3,
    "nn": 3,
    "simulate": 4,
    "module": 4,
    "train": 5,
    "io": 6,
    "analysis": 6,
    "model": 7,
    "cli": 8,
}
# simulate needs only distributions (and the package base).
ALLOWED_EXTRA = {"simulate": {"distributions"}}


def _subpackage(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else None


def _module_level_imports(path: Path) -> list[str]:
    """Top-level cellvi subpackages imported at module level (lazy imports are allowed)."""
    tree = ast.parse(path.read_text())
    rel_parts = path.relative_to(PACKAGE).parts
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_parts[:-1])[: len(rel_parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                if not target:
                    target = [alias.name for alias in node.names][:1]
            elif node.module and node.module.split(".")[0] == "cellvi":
                target = node.module.split(".")[1:] or [a.name for a in node.names][:1]
            else:
                continue
            if target:
                found.append(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "cellvi" and len(parts) > 1:
                    found.append(parts[1])
    return found


def test_files_stay_under_line_limit():
    too_long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"


def test_imports_flow_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        source = _subpackage(path)
        if source is None or source not in RANK:
            continue
        for target in _module_level_imports(path):
            if target not in RANK or target == source:
                continue
            allowed = RANK[target] < RANK[source]
            if source in ALLOWED_EXTRA:
                allowed = target in ALLOWED_EXTRA[source]
            if not allowed:
                violations.append(f"{path.relative_to(PACKAGE)} imports cellvi.{target}")
    assert not violations, "imports against the layer order: " + "; ".join(violations)


def test_import_cellvi_is_light():
    code = (
        "import sys, cellvi; heavy = [m for m in ('torch', 'lightning', 'anndata', 'scanpy', "
        "'jax', 'matplotlib', 'tiledbsoma') if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import cellvi pulled in: {out.stdout.strip()}"
