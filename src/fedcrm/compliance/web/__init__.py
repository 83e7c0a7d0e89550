"""Templates and static assets of the officer's pages (shipped in the package, no CDN)."""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
"""Jinja2 templates of the officer's pages."""
STATIC_DIR = Path(__file__).resolve().parent / "static"
"""CSS and JavaScript served under ``/static``."""

__all__ = ["STATIC_DIR", "TEMPLATES_DIR"]
