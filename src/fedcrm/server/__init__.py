"""fedcrm.server."""
