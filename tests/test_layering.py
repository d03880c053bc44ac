"""The layers of the code (docs/ARCHITECTURE.md), checked on every import statement, function-level ones too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__", "common", "config", "train_common",
                                                                 "locations"}


def imports_of(path: Path) -> set[str]:
    """Every module named by an import in ``path`` (absolute names; relative imports resolved)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-node.level])
                base = f"{pkg}.{base}"
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _files(package: str) -> list[Path]:
    """The files of a package, or the one file of a module (``pipeline.journal``)."""
    path = ROOT / package.replace(".", "/")
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in _files(package):
        for m in sorted(imports_of(f)):
            if m.startswith(forbidden):
                bad.append(f"{f.relative_to(ROOT)} imports {m}")
    return bad


def test_import_scanner_sees_function_level_and_relative_imports(tmp_path):
    f = ROOT / "pipeline" / "_layering_probe.py"
    f.write_text("def g():\n    from pipeline.detection import x\n    import hydra\nfrom .data import y\n")
    try:
        assert {"pipeline.detection", "hydra", "pipeline.data"} <= imports_of(f)
    finally:
        f.unlink()


def test_library_is_free_of_hydra_and_of_the_stages():
    assert _offenders("pipeline", ("hydra", "omegaconf", "stages")) == []


@pytest.mark.parametrize("package, forbidden", [
    ("pipeline.evaluation", ("pipeline.detection", "pipeline.backbones", "pipeline.discovery", "pipeline.mining",
                             "torch")),
    ("pipeline.data", ("pipeline.backbones", "pipeline.detection", "pipeline.discovery", "pipeline.clustering",
                       "pipeline.evaluation", "pipeline.mining")),
    ("pipeline.discovery", ("pipeline.data", "pipeline.detection", "pipeline.mining", "pipeline.viz")),
    ("pipeline.evaluation", ("pipeline.viz",)),            # a caption both show is pipeline.names'
    ("pipeline.journal", ("pipeline.rerun",)),             # the diff both use is pipeline.diff's
    ("pipeline.diff", ("pipeline.rerun", "pipeline.journal")),
    ("pipeline.names", ("pipeline.viz", "pipeline.evaluation")),
])
def test_library_layers(package, forbidden):
    assert _offenders(package, forbidden) == []


def test_no_stage_imports_another_stage():
    bad = []
    for name in sorted(ENTRY_POINTS):
        for m in imports_of(ROOT / "stages" / f"{name}.py"):
            other = m.split(".")[1] if m.startswith("stages.") and m.count(".") >= 1 else None
            if other in ENTRY_POINTS and other != name:
                bad.append(f"stages/{name}.py imports {m}")
            if name.startswith("evaluate") and other == "train_common":
                bad.append(f"stages/{name}.py imports the training module {m}")
    assert bad == []
