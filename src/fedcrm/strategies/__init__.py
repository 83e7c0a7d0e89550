"""fedcrm.strategies."""
