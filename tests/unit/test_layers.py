"""The layers hold: imports flow api -> engine -> shared root modules, never backwards.

Read from the source (every import statement, module level or inside a function), and checked
once more by importing the engine in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "tursi"
# Modules the HTTP layer needs and the engine must never load.
HTTP_ONLY = (
    "flask",
    "flask_limiter",
    "flask_cors",
    "flask_swagger_ui",
    "werkzeug",
    "marshmallow",
    "apispec",
    "apispec_webframeworks",
    "gunicorn",
    "gevent",
)
SHARED = ("config", "errors", "formatting", "threads", "telemetry", "metrics")


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import in `path`."""
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def modules(folder):
    return sorted(p for p in folder.glob("*.py"))


def reaches(module: str, names: list[str], prefix: str) -> bool:
    """True when the import loads `prefix` or a module under it (names may be submodules)."""
    targets = [module] + [f"{module}.{name}" for name in names]
    return any(t == prefix or t.startswith(prefix + ".") for t in targets)


ENGINE = sorted(p for p in (PACKAGE / "engine").rglob("*.py") if "build" not in p.parts)


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: module_name(p))
def test_engine_never_imports_http_modules(path):
    for module, names in imports(path):
        assert not reaches(module, names, "tursi.api"), f"{module_name(path)} imports {module}"
        top = module.split(".")[0]
        assert top not in HTTP_ONLY, f"{module_name(path)} imports {module}"


@pytest.mark.parametrize("name", SHARED)
def test_shared_root_modules_import_neither_layer(name):
    for module, names in imports(PACKAGE / f"{name}.py"):
        for layer in ("tursi.api", "tursi.engine"):
            assert not reaches(module, names, layer), f"tursi.{name} imports {module}"
        assert module.split(".")[0] not in HTTP_ONLY[:-1], f"tursi.{name} imports {module}"


@pytest.mark.parametrize("path", modules(PACKAGE / "api"), ids=lambda p: module_name(p))
def test_api_never_reaches_into_engine_private_names(path):
    engine_aliases = set()
    for module, names in imports(path):
        if module.startswith("tursi.engine"):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module_name(path)} imports {private} from {module}"
            engine_aliases.update(names)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__") or _is_own(node.value):
                continue
            raise AssertionError(f"{module_name(path)}:{node.lineno} reads .{node.attr}")


def _is_own(value: ast.expr) -> bool:
    """self._x, cls._x and super()._x are the class's own business."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and getattr(value.func, "id", "") == "super"


def test_importing_the_engine_loads_no_http_module():
    """In a fresh interpreter: every engine module imported, none of Flask's stack loaded."""
    names = [module_name(p) for p in ENGINE]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HTTP_ONLY!r}"
        " or m.startswith('tursi.api'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_package_root_holds_only_shared_modules():
    """At most 10 modules at tursi/'s root: what every layer shares, and the entry points.
    Anything only Flask needs lives in tursi/api/, anything only the engine needs in
    tursi/engine/."""
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert root == sorted(["__init__", "cli", "wsgi", *SHARED])
    assert len(root) <= 10
