"""The base install runs every command: every package the product imports is declared in
pyproject.toml (the base dependencies, or for an optional integration its own extra), the
libraries whose internals the code uses are bounded, and constraints.txt pins what passed.

CI's ``make demo`` runs the demo in a venv holding the base install only; these checks catch
an undeclared import anywhere else, in a second and without building a venv.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedrag_jax"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# modules that may import only what their extra adds on top of the base install
EXTRA_MODULES = {"bridges/llamaindex.py": "llamaindex", "bridges/langchain.py": "langchain",
                 "bridges/haystack.py": "haystack"}
# run-time needs that no `import` line shows: what a product path makes a library import
INDIRECT = {"jinja2": "transformers' apply_chat_template (generator.py, batches.py)"}
# libraries whose internals the code depends on: an upper bound (next minor) each
BOUNDED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "flwr", "gguf",
           "tokenizers", "transformers")


def _name(requirement: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(extra: str | None = None) -> set[str]:
    project = PYPROJECT["project"]
    reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {_name(r) for r in reqs}


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """An import inside ``try: ... except ImportError`` (a fallback or a named error)."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            for handler in parent.handlers:
                names = [getattr(e, "id", None) for e in
                         (handler.type.elts if isinstance(handler.type, ast.Tuple)
                          else [handler.type])]
                if {"ImportError", "ModuleNotFoundError"} & set(names):
                    return True
        node = parent
    return False


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, lazy ones (in functions) too."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        if _optional(node, parents):
            continue
        names |= {m.split(".")[0] for m in mods}
    return {n for n in names if n not in sys.stdlib_module_names and n != "fedrag_jax"}


def test_every_product_import_is_a_declared_dependency():
    dists = importlib.metadata.packages_distributions()
    base = _declared()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        allowed = base | (_declared(EXTRA_MODULES[rel]) if rel in EXTRA_MODULES else set())
        for module in sorted(_imports(path)):
            providers = {_normalize(d) for d in dists.get(module, [])}
            if not providers:
                problems.append(f"{rel}: imports {module!r}, which no installed distribution "
                                "provides")
            elif not providers & allowed:
                where = f"extra [{EXTRA_MODULES[rel]}]" if rel in EXTRA_MODULES else \
                    "the base dependencies"
                problems.append(f"{rel}: imports {module!r} (distribution "
                                f"{'/'.join(sorted(providers))}), not declared in {where}")
    for dist, why in INDIRECT.items():
        if dist not in base:
            problems.append(f"{dist} is needed by {why} but is not a base dependency")
    assert not problems, "\n".join(problems)


def test_the_import_scan_sees_lazy_and_optional_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nimport numpy as np\n\ndef f():\n    from yaml import x\n"
                      "try:\n    import scann\nexcept ImportError:\n    scann = None\n"
                      "from . import sibling\nfrom fedrag_jax import errors\n")
    assert _imports(source) == {"numpy", "yaml"}


@pytest.mark.parametrize("dist", BOUNDED)
def test_libraries_whose_internals_we_use_have_an_upper_bound(dist):
    (req,) = [r for r in PYPROJECT["project"]["dependencies"] if _name(r) == dist]
    assert "<" in req, f"{req!r}: add an upper bound (the next minor release)"


def test_constraints_pin_every_declared_dependency():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {_name(line): line for line in lines if line and not line.startswith("#")}
    assert all("==" in line for line in pins.values()), "constraints.txt holds exact versions"
    wanted = _declared() | _declared("test")
    assert sorted(wanted - set(pins)) == [], "declared but not pinned in constraints.txt"
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile, "the Makefile installs with the constraints"
