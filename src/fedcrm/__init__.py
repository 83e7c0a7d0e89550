"""fedcrm: privacy-preserving federated learning for CRM data.

Importing the package applies the offline, loopback-only defaults of `fedcrm._env` before
Flower or Ray can read their environment (both read it at import time).
"""

from fedcrm._env import apply_safe_defaults

apply_safe_defaults()

__version__ = "0.1.0"

__all__ = ["__version__", "apply_safe_defaults"]
