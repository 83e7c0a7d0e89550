"""fedcrm.data."""
