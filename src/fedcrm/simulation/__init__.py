"""fedcrm.simulation: experiments of any task on Flower's simulation engine.

One experiment loader, one runner, one report writer, simulated consent, and an in-process grid
for benchmarks and tests.
"""

from fedcrm.simulation.config import ExperimentConfig, load_experiment, parse_experiment
from fedcrm.simulation.consent_setup import ConsentSetup, import_consent, write_consent_csv
from fedcrm.simulation.grid import InProcessGrid, in_process_identity, partition_nodes
from fedcrm.simulation.runner import resume_experiment, run_experiment, simulate

__all__ = [
    "ConsentSetup",
    "ExperimentConfig",
    "InProcessGrid",
    "import_consent",
    "in_process_identity",
    "load_experiment",
    "parse_experiment",
    "partition_nodes",
    "resume_experiment",
    "run_experiment",
    "simulate",
    "write_consent_csv",
]
