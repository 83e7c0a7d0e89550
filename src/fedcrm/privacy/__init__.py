"""fedcrm.privacy."""
