"""Benchmark: bulk consent import (``ConsentRegistry.import_csv``) of one branch file.

Run: ``.venv/bin/python bench/consent_import.py`` (7,043 customers, the size of IBM Telco, into
a fresh SQLite file; ``--customers N``, ``--url postgresql+psycopg://...`` for another store).

The CSV is written by the simulation's own writer (``write_consent_csv``) with the demo's
make-up: 5 % given then withdrawn (two rows), 2 % refused, 3 % never asked, the rest given, so
7,043 customers are 6,832 customers in the file and 7,184 rows. The import is timed alone
(store migrated beforehand), as wall time and as this process's CPU time (on a shared machine
wall time also measures the neighbours). The script then checks what the import guarantees:
one audit leaf per row, and the log verifies (after signing a checkpoint).
"""

import argparse
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcrm.compliance import ConsentRegistry, open_store, sqlite_url
from fedcrm.compliance.audit import AuditLog
from fedcrm.simulation.consent_setup import ConsentSetup, import_consent, write_consent_csv


def main() -> None:
    """Write the file, import it, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=7043)
    parser.add_argument("--url", default=None, help="store URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = args.url or sqlite_url(folder / "compliance.db")
        factory = open_store(url)
        registry = ConsentRegistry(factory)
        customers = [f"p_{index:08x}" for index in range(args.customers)]
        csv_path = folder / "consent.csv"
        made_up = write_consent_csv(
            csv_path,
            customers,
            ConsentSetup(),
            partition_id=0,
            now=datetime(2026, 6, 1, tzinfo=UTC),
            seed=7,
        )
        rows = sum(1 for _ in csv_path.open(encoding="utf-8")) - 1
        log = AuditLog(factory)
        before = log.size()
        wall, cpu = time.perf_counter(), time.process_time()
        import_consent(registry, "bench-branch", csv_path)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        leaves = log.size() - before
        log.checkpoint(Ed25519PrivateKey.generate())
        report = log.verify()
        print(f"python {platform.python_version()}, store {url.split(':', 1)[0]}")
        print(f"customers {args.customers} ({made_up}), rows {rows}")
        print(f"import: wall {wall:.2f} s, cpu {cpu:.2f} s")
        print(f"audit leaves added {leaves}, log verifies: {report.ok}")
        for issue in report.issues:
            print(f"  issue: {issue}")
        factory.kw["bind"].dispose()


if __name__ == "__main__":
    main()
