"""Each ML subpackage's ``__all__`` is its public API, and the code imports only that API."""

import ast
import importlib
import inspect
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("client", "data", "models", "privacy", "server", "simulation", "strategies")


def _package(name: str) -> ModuleType:
    return importlib.import_module(f"fedcrm.{name}")


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_exported_members_resolve_to_their_definitions(name: str) -> None:
    package = _package(name)
    exported = package.__all__
    assert exported == sorted(set(exported))
    assert dir(package) == exported
    for module, names in package._EXPORTS.items():
        source = importlib.import_module(f"fedcrm.{name}.{module}")
        for member_name in names:
            member = getattr(package, member_name)
            assert member is getattr(source, member_name), member_name
            if (
                inspect.isfunction(member) or inspect.isclass(member)
            ) and member.__module__.startswith("fedcrm."):
                assert inspect.getdoc(member), f"fedcrm.{name}.{member_name} has no docstring"


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_unknown_names_are_attribute_errors(name: str) -> None:
    with pytest.raises(AttributeError, match="no attribute"):
        _package(name).no_such_member  # noqa: B018


def _cross_imports() -> list[tuple[str, str, str, str]]:
    """(importing file, subpackage, module, name) of every import across subpackages."""
    found = []
    for root in ("src", "bench"):
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = path.relative_to(ROOT).parts
            owner = parts[2] if parts[0] == "src" and len(parts) > 3 else None
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.ImportFrom) and node.module):
                    continue
                dotted = node.module.split(".")
                if len(dotted) == 3 and dotted[:1] == ["fedcrm"] and dotted[1] in SUBPACKAGES:
                    if dotted[1] == owner:
                        continue
                    found += [(str(path), dotted[1], dotted[2], a.name) for a in node.names]
    return found


def test_code_outside_a_subpackage_imports_only_its_public_api() -> None:
    imports = _cross_imports()
    assert imports  # the scan found the code
    private = [
        f"{path}: fedcrm.{sub}.{module}.{name}"
        for path, sub, module, name in imports
        if name not in _package(sub)._EXPORTS.get(module, ())
    ]
    assert not private, "add these to the subpackage's _EXPORTS or stop using them:\n" + "\n".join(
        private
    )
