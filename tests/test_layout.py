"""One library, one application: the core never pulls in :mod:`pyro_bmr.paper`, nor
the optional Lightning callback (:mod:`pyro_bmr.lightning`) and Lightning itself."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_bmr"

_CHECK = (
    "import pyro_bmr, pyro_bmr.nn, sys; "
    "bad = {'torchvision','matplotlib','sklearn','pyro_bmr.paper','lightning',"
    "'pyro_bmr.lightning'} & set(sys.modules); "
    "assert not bad, bad"
)


def test_importing_the_library_imports_no_application_dependency():
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Absolute names of the modules ``path`` imports, with their line numbers."""
    # the package a module's relative imports start from (for __init__.py, its own)
    package = list(path.relative_to(PACKAGE.parent).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            # ``from pyro_bmr import paper`` names the package as an imported name
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_no_library_module_imports_the_application():
    library = [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "paper" not in path.relative_to(PACKAGE).parts and path != PACKAGE / "__main__.py"
    ]
    assert PACKAGE / "__init__.py" in library and PACKAGE / "nn" / "__init__.py" in library
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
        for path in library
        for line, module in _imported_modules(path)
        if module == "pyro_bmr.paper" or module.startswith("pyro_bmr.paper.")
    ]
    assert not offending, offending


def test_the_scan_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    # the scan itself must not miss the forms an import can take
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "pyro_bmr")
    (tmp_path / "pyro_bmr" / "nn").mkdir(parents=True)
    sources = {
        "a.py": "import pyro_bmr.paper\n",
        "b.py": "from pyro_bmr import paper\n",
        "c.py": "from .paper.cli import main\n",
        "nn/d.py": "from ..paper import fit_method\n",
        "nn/__init__.py": "from .. import paper\n",
        "e.py": "def f():\n    from pyro_bmr.paper.methods import METHODS\n",
    }
    for name, source in sources.items():
        path = tmp_path / "pyro_bmr" / name
        path.write_text(source)
        modules = {module for _, module in _imported_modules(path)}
        assert any(m == "pyro_bmr.paper" or m.startswith("pyro_bmr.paper.") for m in modules), (
            name,
            modules,
        )


def test_only_the_lightning_module_imports_lightning():
    # Lightning is an optional extra: the callback's module is the one that needs it
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "lightning.py"
        for line, module in _imported_modules(path)
        if module.split(".")[0] in ("lightning", "pytorch_lightning")
        or module.startswith("pyro_bmr.lightning")
    ]
    assert not offending, offending
