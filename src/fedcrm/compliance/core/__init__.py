"""Configuration of the compliance service (pydantic-settings, built once at the edge).

Also the Art. 30 records built from a run directory's real configuration
(:func:`ropa_from_run`) and their Markdown renderings, a DPIA skeleton included.
"""

from fedcrm.compliance.core.config import (
    CkksParameters,
    ConsentGate,
    Controller,
    DpTarget,
    ProcessingActivity,
    RopaConfig,
    RopaSource,
    SecAggParameters,
    SecurityMeasures,
    Settings,
    default_ropa,
    get_settings,
)
from fedcrm.compliance.core.ropa_from_run import (
    DataSchema,
    RunConfigurationError,
    RunFiles,
    build_ropa,
    read_run,
    ropa_from_run,
)
from fedcrm.compliance.core.ropa_markdown import dpia_markdown, ropa_markdown

__all__ = [
    "CkksParameters",
    "ConsentGate",
    "Controller",
    "DataSchema",
    "DpTarget",
    "ProcessingActivity",
    "RopaConfig",
    "RopaSource",
    "RunConfigurationError",
    "RunFiles",
    "SecAggParameters",
    "SecurityMeasures",
    "Settings",
    "build_ropa",
    "default_ropa",
    "dpia_markdown",
    "get_settings",
    "read_run",
    "ropa_from_run",
    "ropa_markdown",
]
