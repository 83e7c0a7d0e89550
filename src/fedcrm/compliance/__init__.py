"""fedcrm.compliance."""
