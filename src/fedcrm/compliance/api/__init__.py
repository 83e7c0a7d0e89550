"""The compliance service (FastAPI): consent, ledger, audit and Art. 30 routes.

Build it with :func:`create_app`; ``fedcrm compliance serve`` runs it with uvicorn.
"""

from fedcrm.compliance.api.main import create_app

__all__ = ["create_app"]
