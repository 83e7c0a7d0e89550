"""Lazy public API of a subpackage: ``__all__`` plus a module ``__getattr__`` (PEP 562).

Each ML subpackage (``fedcrm.privacy``, ``fedcrm.strategies``, ...) lists the names other code
may use in its ``__init__``, as Flower and httpx do, but resolves them on first access instead
of importing every module eagerly: eager imports would load torch, Flower and TenSEAL for any
``fedcrm`` command and would close import cycles between subpackages (``privacy`` and
``strategies`` import from each other's modules).
"""

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``__all__``, ``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: The subpackage's ``__name__``.
        exports: Module name (inside the package) -> the public names it defines.

    Raises:
        ValueError: A name is exported by two modules.
    """
    owner: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in owner:
                raise ValueError(f"{package}.{name} is exported by {owner[name]} and {module}")
            owner[name] = module
    public = sorted(owner)

    def __getattr__(name: str) -> Any:
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return public

    return public, __getattr__, __dir__
