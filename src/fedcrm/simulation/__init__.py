"""fedcrm.simulation."""
