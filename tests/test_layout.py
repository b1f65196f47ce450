"""The package tree is the architecture: four folders whose imports run one way.

models <- hashing <- attention <- evaluation: a folder imports only from folders to its left
(attention runs the hashing encoders; hashing never runs attention). At the top, `errors` and
`data` are leaves every folder may use, `generate` sits between attention and evaluation (the
LongBench runner decodes through it), and `cli` is the entry point nothing imports.
`pallas_kernels` is a library beside the package and imports none of it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dashkv_jax"
FOLDERS = ("models", "hashing", "attention", "evaluation")
# The rank of each importable unit: a module may import units of equal or lower rank.
RANK = {"errors": -1, "data": -1, **{f: i for i, f in enumerate(FOLDERS)}, "generate": 2.5}
RANK.update(cli=9, __init__=9)


def _unit(module: str) -> str:
    """dashkv_jax.attention.hashed -> "attention"; dashkv_jax.data -> "data"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every dashkv_jax / pallas_kernels module a file imports (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dashkv_jax":  # `from dashkv_jax import data`: the submodule
                found += [(node.lineno, f"dashkv_jax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m.split(".")[0] in ("dashkv_jax", "pallas_kernels")]


def test_the_package_has_the_four_folders():
    for folder in FOLDERS:
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "data.py", "errors.py", "generate.py"]


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_imports_run_one_way(path):
    relative = path.relative_to(PACKAGE)
    unit = relative.parts[0] if len(relative.parts) > 1 else relative.stem
    wrong = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if module.startswith("dashkv_jax.")
        and _unit(module) in RANK
        and RANK[_unit(module)] > RANK[unit]
    ]
    wrong += [f"line {line}: {m}" for line, m in _imports(path) if m == "dashkv_jax"]
    assert not wrong, f"{relative} ({unit}) imports from above it: {wrong}"


@pytest.mark.parametrize("path", sorted((ROOT / "pallas_kernels").rglob("*.py")), ids=str)
def test_kernels_import_nothing_of_the_package(path):
    assert not [m for _, m in _imports(path) if m.startswith("dashkv_jax")]
