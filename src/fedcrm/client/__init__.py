"""fedcrm.client."""
