"""Each ML subpackage's ``__all__`` is its public API, and the code imports only that API.

Every ``__init__`` is eager: plain imports and ``__all__``, as Flower's
``serverapp/strategy/__init__.py``, so that mypy and editors see the real types.
"""

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = (
    "client",
    "data",
    "models",
    "privacy",
    "server",
    "simulation",
    "strategies",
    "tasks",
)


def _package(name: str) -> ModuleType:
    return importlib.import_module(f"fedcrm.{name}")


def _isort_key(name: str) -> tuple[int, list[str | int]]:
    """Ruff's RUF022 order of an eager ``__all__``: CONSTANTS, then Classes, then functions."""
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return kind, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _documented(member: object) -> bool:
    """A fedcrm function or class has a docstring (other exports need none)."""
    if not (inspect.isfunction(member) or inspect.isclass(member)):
        return True
    return not member.__module__.startswith("fedcrm.") or bool(inspect.getdoc(member))


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_all_is_sorted_unique_and_resolves(name: str) -> None:
    package = _package(name)
    exported = package.__all__
    assert len(exported) == len(set(exported))
    assert exported == sorted(exported, key=_isort_key)  # ruff's order (RUF022)
    for member_name in exported:
        member = getattr(package, member_name)
        assert _documented(member), f"fedcrm.{name}.{member_name} has no docstring"


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_exports_are_what_the_init_imports(name: str) -> None:
    """Every name an ``__init__`` binds (other than its modules) is listed, and no more."""
    package = _package(name)
    bound = {
        member_name
        for member_name, member in vars(package).items()
        if not member_name.startswith("_") and not inspect.ismodule(member)
    }
    assert bound == set(package.__all__)
    init = Path(inspect.getfile(package))
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.startswith(f"fedcrm.{name}."), node.module  # its own modules


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_unknown_names_are_attribute_errors(name: str) -> None:
    with pytest.raises(AttributeError, match="no attribute"):
        _package(name).no_such_member  # noqa: B018


def _public(sub: str, module: str, name: str) -> bool:
    """Whether ``from fedcrm.<sub>.<module> import name`` imports ``fedcrm.<sub>``'s API."""
    package = _package(sub)
    if name not in package.__all__:
        return False
    try:
        source = importlib.import_module(f"fedcrm.{sub}.{module}")
    except ModuleNotFoundError:  # a removed module: reported with the private imports
        return False
    return getattr(source, name, None) is getattr(package, name)


def _imports() -> list[tuple[Path, str | None, list[str], list[str]]]:
    """(file, owning subpackage, imported module's dotted parts, names) of each fedcrm import."""
    found = []
    for root in ("src", "bench"):
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = path.relative_to(ROOT).parts
            owner = parts[2] if parts[0] == "src" and len(parts) > 3 else None
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module:
                    dotted = node.module.split(".")
                    if dotted[0] == "fedcrm":
                        found.append((path, owner, dotted, [a.name for a in node.names]))
    return found


def _cross_imports() -> list[tuple[Path, str, str, str]]:
    """(file, subpackage, module, name) of ``from fedcrm.<sub>.<module> import name`` across
    subpackages (``<module>`` one level down: a module, or a nested package such as
    ``fedcrm.privacy.he``)."""
    return [
        (path, dotted[1], dotted[2], name)
        for path, owner, dotted, names in _imports()
        if len(dotted) == 3 and dotted[1] in SUBPACKAGES and dotted[1] != owner
        for name in names
    ]


def test_the_scan_finds_the_cross_imports() -> None:
    imports = _cross_imports()
    assert {sub for _, sub, _, _ in imports} >= {"client", "server", "strategies", "tasks"}
    assert any(path.is_relative_to(ROOT / "bench") for path, _, _, _ in imports)


def test_code_outside_a_subpackage_imports_only_its_public_api() -> None:
    private = [
        f"{path.relative_to(ROOT)}: fedcrm.{sub}.{module}.{name}"
        for path, sub, module, name in _cross_imports()
        if not _public(sub, module, name)
    ]
    assert not private, "add these to the subpackage's __all__ or stop using them:\n" + "\n".join(
        private
    )


def test_the_core_reaches_a_task_only_through_fedcrm_tasks() -> None:
    """No code of the core imports a task plug-in's modules (``fedcrm.tasks.<task>.<module>``).

    The core runs every task through `fedcrm.tasks.Task`; a task's own modules are its
    internals. Benchmarks of one task (``bench/``) may use them.
    """
    reaching = [
        f"{path.relative_to(ROOT)}: {'.'.join(dotted)}"
        for path, owner, dotted, _ in _imports()
        if len(dotted) > 3
        and dotted[1] == "tasks"
        and owner != "tasks"
        and not path.is_relative_to(ROOT / "bench")
    ]
    assert not reaching, "import these through fedcrm.tasks (the Task interface):\n" + "\n".join(
        reaching
    )
