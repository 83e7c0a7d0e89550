"""Configuration of the compliance service (pydantic-settings, built once at the edge)."""

from fedcrm.compliance.core.config import (
    CkksParameters,
    Controller,
    DpTarget,
    ProcessingActivity,
    RopaConfig,
    SecurityMeasures,
    Settings,
    get_settings,
)

__all__ = [
    "CkksParameters",
    "Controller",
    "DpTarget",
    "ProcessingActivity",
    "RopaConfig",
    "SecurityMeasures",
    "Settings",
    "get_settings",
]
