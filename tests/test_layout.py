"""The house's import order (README.md, Layout): a module imports only from its own stage and the ones below it,
lazy imports inside functions included. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

# Bottom to top: each entry may import from those before it. (`scaling` runs pretraining for its sweeps, so it
# sits above `train`; `report` only reads run folders.)
ORDER = ["hardware", "config", "runs", "registry", "report", "model", "tokenizer", "data", "parallel", "infer",
         "train", "scaling", "align", "serve", "demo", "cli", "__main__"]  # fmt: skip

# Imports against the order, each with the reason it stands.
EXCEPTIONS = {
    # runs.py builds on config.py; config's writer borrows the atomic write from runs.py instead of a third copy.
    ("lmforge.config", "lmforge.runs"),
    # The one resolver of every MODEL (train/resolve.py: runs, checkpoints, HF folders, .gguf files) reads run
    # folders through train's checkpoint code (latest intact checkpoint, file hashes); inference loads through it.
    ("lmforge.infer.loading", "lmforge.train.resolve"),
}

PACKAGE = Path(lmforge.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every lmforge module `path` imports, at the top or inside a function."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" for a in node.names} if target == "lmforge" else {target}
    return {m for m in found if m.startswith("lmforge.")}


def stage(module: str) -> str:
    return module.split(".")[1]


def test_every_stage_of_the_package_is_placed():
    stages = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
    stages = {s for s in stages if (PACKAGE / s).is_dir() or (PACKAGE / f"{s}.py").is_file()} - {"__pycache__"}
    assert stages <= set(ORDER), f"place {sorted(stages - set(ORDER))} in ORDER (and in README.md's Layout)"


def test_imports_point_down_the_layout():
    against = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        if source == "lmforge":
            continue
        for target in sorted(imported_modules(path)):
            if target == "lmforge.__version__" or stage(target) == stage(source):
                continue
            if ORDER.index(stage(target)) > ORDER.index(stage(source)) and (source, target) not in EXCEPTIONS:
                against.append(f"{source} imports {target}")
    assert not against, "imports against the layout:\n" + "\n".join(against)


def test_the_checker_sees_lazy_and_relative_imports():
    paged = PACKAGE / "infer" / "paged.py"  # relative: `from .kv_cache import ...`; lazy ones inside functions
    assert "lmforge.infer.kv_cache" in imported_modules(paged)
    assert "lmforge.train.resolve" in imported_modules(PACKAGE / "infer" / "loading.py")  # inside a function
