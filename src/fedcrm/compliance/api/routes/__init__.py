"""Routers of the compliance service, one module per resource."""
