"""Exceptions raised by fedcrm.

Hierarchy::

    FedCrmError
    ├── DataError              a branch export or data set is unusable
    │   └── SchemaViolation    one or more schema problems (all listed at once)
    ├── ConfigError            an experiment or app configuration is invalid
    ├── DataPackageMissing     a package that ships a real data set is not installed
    └── InconsistentReplies    branch replies cannot be aggregated together

A branch never raises across the network: it answers with an error ``Message`` whose code is an
:class:`ErrorCode`.
"""

from collections.abc import Sequence
from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes of the error replies a branch sends (``flwr.app.Error.code``), one per condition."""

    DP_ROUND_FAILED = 4301
    """A DP round could not be set up (bad settings, corrupted accountant): nothing trained."""
    CONSENT_REFUSED = 4501
    """The branch refuses the run's purpose (an evaluation reply; training and the statistics
    query answer with a structured refusal instead)."""
    CONSENT_GATE_FAILED = 4502
    """The consent gate could not run (registry unreachable): no row was used."""
    BRANCH_DATA_FAILED = 4601
    """The branch's data or the server's settings are unusable for this task (the reason says
    what to fix): nothing trained, nothing sent."""


class FedCrmError(Exception):
    """Base class of every error fedcrm raises on purpose."""


class DataError(FedCrmError):
    """A branch export or data set cannot be used as it is."""


class SchemaViolation(DataError):
    """A table does not satisfy its declared schema.

    Args:
        problems: Every problem found, each saying what is wrong and how to fix it.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} schema problem(s):\n{lines}")


class ConfigError(FedCrmError):
    """An experiment or application configuration is invalid."""


class DataPackageMissing(FedCrmError):
    """The package that ships a real data set is not installed."""


class InconsistentReplies(FedCrmError):
    """Branch replies disagree in shape or content and cannot be aggregated."""
