"""Public names, and the import boundary: compliance never pulls in the ML stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fedcrm.compliance
import fedcrm.compliance.api
import fedcrm.compliance.audit
import fedcrm.compliance.consent
import fedcrm.compliance.core

FORBIDDEN = ("torch", "opacus", "tenseal", "flwr")


@pytest.mark.parametrize(
    "module",
    [
        fedcrm.compliance,
        fedcrm.compliance.audit,
        fedcrm.compliance.api,
        fedcrm.compliance.consent,
        fedcrm.compliance.core,
    ],
    ids=lambda m: m.__name__,
)
def test_exported_members(module: object) -> None:
    exported = module.__all__  # type: ignore[attr-defined]
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(module, name), name
        member = getattr(module, name)
        if callable(member) or isinstance(member, type):
            assert member.__doc__, f"{name} has no docstring"


def test_no_ml_stack_imported() -> None:
    """``import fedcrm.compliance.audit`` (and then the CLI) never imports the ML stack."""
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "def bad():\n"
        f"    found = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "    found += [m for m in sys.modules if m.startswith('fedcrm.') and not "
        "(m.startswith('fedcrm.compliance') or m in ('fedcrm.exceptions', 'fedcrm._env'))]\n"
        "    return found\n"
        "import fedcrm.compliance.audit\n"
        "print('audit:', ','.join(bad() + [m for m in ('typer',) if m in sys.modules]))\n"
        "import fedcrm.compliance.audit.cli\n"
        "print('cli:', ','.join(bad()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split("\n")[:2] == ["audit: ", "cli: "], result.stdout


def test_service_and_cli_import_no_ml_stack() -> None:
    """The FastAPI service and ``fedcrm compliance`` stay inside the boundary too."""
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import fedcrm.compliance.api, fedcrm.compliance.cli\n"
        f"found = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "found += [m for m in sys.modules if m.startswith('fedcrm.') and not "
        "(m.startswith('fedcrm.compliance') or m in ('fedcrm.exceptions', 'fedcrm._env'))]\n"
        "print('found:', ','.join(found))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "found:", result.stdout
