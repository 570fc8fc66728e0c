"""The design's rules, checked: arrows point pipeline -> stages -> jora_model, Haiku stays inside
jora_model, and importing jora does no work (no JAX, no device queries, no torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jora_model", "stages", "pipeline")
MAY_IMPORT = {"jora_model": {"jora_model"}, "stages": {"jora_model", "stages"},
              "pipeline": {"jora_model", "stages", "pipeline"}}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_arrows_point_one_way_and_haiku_stays_in_jora_model():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            imported = _imports(path)
            ours = imported & set(PACKAGES)
            assert ours <= MAY_IMPORT[package], f"{path.relative_to(ROOT)} imports {ours - MAY_IMPORT[package]}"
            if package != "jora_model":
                assert "haiku" not in imported, f"{path.relative_to(ROOT)} imports haiku"


def test_import_does_no_work():
    code = ("import sys, jora_model, stages.convert, stages.base, pipeline.cli; "
            "print(sorted(m for m in ('jax', 'jaxlib', 'haiku', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
