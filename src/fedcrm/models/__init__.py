"""fedcrm.models."""
