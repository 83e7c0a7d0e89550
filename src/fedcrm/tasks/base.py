"""The task plug-in interface: what one model family brings to the one federation core.

The core (`fedcrm.server`, `fedcrm.client`, `fedcrm.simulation`) runs every round the same way:
statistics query, consent gate, local training (plain or DP-SGD), reply validation, wrappers,
aggregation, pooled evaluation, model selection, ledger, lineage and audit. A `Task` fills in the
task-specific steps, as Flower's apps are thin wiring over a ``task.py``. `TASKS` is the
registry (the way Opacus registers its accountants); a new task is one folder under
``fedcrm/tasks/`` and one line in :func:`registry`. See ``docs/tasks.md`` for the steps.
"""

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar

import numpy as np
from flwr.app import MetricRecord, RecordDict
from numpy.typing import NDArray

from fedcrm.exceptions import ConfigError
from fedcrm.privacy import AccountingEvent, DPSGDConfig, NoisePlan
from fedcrm.settings import Value, from_mapping


class CustomerData(Protocol):
    """What the core needs of a branch's (split) data, whatever the task."""

    @property
    def num_examples(self) -> int:
        """Training examples (the branch's FedAvg weight)."""
        ...

    def subjects(self) -> dict[str, list[str]]:
        """The pseudonymous customer ids in each part (``train``, ``val``, ``test``)."""
        ...

    def keep(self, kept: set[str]) -> Self:
        """The data of the customers in ``kept`` only (the consent gate's result)."""
        ...


SettingsT = TypeVar("SettingsT")
DataT = TypeVar("DataT", bound=CustomerData)
SpecT = TypeVar("SpecT")

Arrays = dict[str, NDArray[Any]]
"""Named model arrays, in the model's order (what travels in an ArrayRecord)."""
MetricValue = int | float | list[int] | list[float]
PrivacyUnitName = Literal["record", "customer"]


@dataclass(frozen=True)
class BranchSource:
    """Where one branch's data and state live, as the client core resolved them.

    Attributes:
        folder: The branch's own folder: privacy accountants, consent salts, task state.
        name: The branch's name in the ledger, the consent registry and its manifests.
        number: The simulated partition id (stable across runs), else the SuperNode's id.
        data_path: Deployment: the branch's export named in its node config (raw ids,
            pseudonymised with ``key`` on load); ``None`` in a simulation.
        key: The branch's HMAC key (pseudonyms; the accountant key is derived from it).
        node_config: The node's config, for task-specific keys.
        simulation: The simulated federation's data handle (`TaskExperiment.prepare`), or
            ``None`` on a deployed node.
    """

    folder: Path
    name: str
    number: int
    data_path: Path | None = None
    key: bytes | None = None
    node_config: Mapping[str, object] = field(default_factory=dict)
    simulation: object | None = None


@dataclass(frozen=True)
class RoundContext:
    """What a branch's task step knows about the round beyond its data and settings.

    Attributes:
        server_round: The round (0: the statistics query).
        seed: The run's seed mixed with the round and the branch number (shuffles, negatives):
            ``run_seed + 1000 * server_round + number % 1000``.
        run_seed: The run's seed (initialisations every branch must share).
        config: The server message's config (shared statistics such as the churn scaler, and
            strategy keys such as FedProx's ``proximal-mu``).
        state: The node's ``Context.state``: stays on the branch between rounds.
        folder: The branch's folder (where a task keeps what the branch serves from later).
    """

    server_round: int
    seed: int
    run_seed: int
    config: Mapping[str, object]
    state: RecordDict
    folder: Path


@dataclass(frozen=True)
class LocalUpdate:
    """A branch's new shared arrays after local training, and what it reports with them."""

    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PrivateRows:
    """How a task's DP-SGD sees a branch: its rows, batch and privacy unit (planned once).

    Attributes:
        rows: DP-SGD rows (records, or customers with all their rows).
        batch_size: Expected rows per step (the Poisson rate is this over ``rows``).
        epochs: Local epochs per round.
        unit: What one row is, so what ε protects.
        note: The privacy-unit statement that goes into the report.
    """

    rows: int
    batch_size: int
    epochs: int
    unit: PrivacyUnitName
    note: str


@dataclass(frozen=True)
class DPStatement:
    """What a task's DP-SGD protects, for the run's report and summary.

    Attributes:
        mechanism: The mechanism, with its paper.
        relation: The neighbouring relation (what one added or removed unit is).
        unit_note: What one DP-SGD row is, so what ε protects.
        not_covered: What the run releases without noise.
    """

    mechanism: str
    relation: str
    unit_note: str
    not_covered: str


@dataclass(frozen=True)
class PrivateUpdate:
    """A branch's arrays after a DP-SGD round and the steps it took (``None``: no step)."""

    arrays: Arrays
    num_examples: int
    event: AccountingEvent | None


class Task(ABC, Generic[SettingsT, DataT]):
    """One model family on the federation core (churn, recommendation, ...).

    Subclasses set the class attributes and implement the server-side and branch-side steps;
    `experiment` adds what a simulated experiment needs (data, baselines, report).
    """

    name: ClassVar[str]
    """The task's name in experiment files, run configs and messages (``task``)."""
    settings_type: ClassVar[type[Any]]
    """A frozen dataclass of the task's settings (kebab-case keys in ``[federation]``)."""
    model_name: ClassVar[str]
    """The model's name in the privacy ledger, lineage and model releases."""
    purpose: ClassVar[str]
    """The processing purpose of the task's privacy budget and its default consent purpose."""
    strategies: ClassVar[frozenset[str]] = frozenset({"fedavg", "fedadam"})
    """Server strategies whose branch side the task implements (FedProx needs a proximal term)."""
    dp_keys: ClassVar[frozenset[str]] = frozenset()
    """``[dp]`` keys that are fields of `settings_type` (task-specific DP options)."""
    model_file: ClassVar[str]
    """The released model's file name in a run directory (`save_model`, `load_model`)."""
    experiment_path: ClassVar[str]
    """``module:Class`` of the task's `TaskExperiment`, imported on first use: its data loaders
    and baselines are heavy, and a branch process never needs them."""
    cli_path: ClassVar[str]
    """The module of the task's command-line parts: ``results_tables`` and ``COMMANDS``."""

    def settings(
        self,
        values: Mapping[str, object],
        *,
        where: str,
        strict: bool,
        defaults: Mapping[str, object] | None = None,
    ) -> SettingsT:
        """The task's settings from kebab-case ``values``.

        Args:
            values: A TOML table, a run config or a message config.
            where: Named in error messages.
            strict: Refuse keys the settings do not declare (TOML); ``False`` for a run config
                or a message, which hold other settings too.
            defaults: Values used where ``values`` is silent.

        Raises:
            ConfigError: A key is unknown (strict), a value invalid.
        """
        parsed: SettingsT = from_mapping(
            self.settings_type, values, where=where, ignore_unknown=not strict, defaults=defaults
        )
        return parsed

    def check_strategy(self, strategy: str) -> None:
        """Refuse a server strategy the task's branch side does not implement.

        Raises:
            ConfigError: ``strategy`` is not in `strategies`.
        """
        if strategy not in self.strategies:
            raise ConfigError(
                f"the {self.name} task supports strategy {sorted(self.strategies)}, got "
                f"{strategy!r}"
            )

    # ------------------------------------------------------------------ server side

    @abstractmethod
    def initial_arrays(self, settings: SettingsT, *, seed: int) -> Arrays:
        """The round-0 model every branch starts from (public: a seeded initialisation)."""

    def combine_statistics(
        self, settings: SettingsT, records: Sequence[MetricRecord]
    ) -> dict[str, Value | list[float]]:
        """Combine the branches' statistics into values every later message carries.

        Raises:
            fedcrm.exceptions.InconsistentReplies: A record is malformed.
        """
        del settings, records
        return {}

    @abstractmethod
    def aggregate_evaluation(
        self, settings: SettingsT, records: list[RecordDict], weight_key: str
    ) -> MetricRecord:
        """Pool the branches' evaluation replies into the federation's metrics.

        Raises:
            fedcrm.exceptions.InconsistentReplies: A reply is malformed.
        """

    @abstractmethod
    def selection_metric(self, settings: SettingsT) -> str | None:
        """The pooled validation metric whose best round is released (``None``: the last)."""

    @abstractmethod
    def headline(self, settings: SettingsT) -> tuple[str, str]:
        """The label and the pooled metric key logs and progress bars show each round."""

    # ------------------------------------------------------------------ branch side

    @abstractmethod
    def load(self, source: BranchSource, settings: SettingsT, *, seed: int) -> DataT:
        """Read, check and pseudonymise the branch's data; split it (the same on every call).

        Raises:
            fedcrm.exceptions.FedCrmError: The data is unusable (the message says how to fix).
        """

    def statistics(self, data: DataT, settings: SettingsT) -> dict[str, MetricValue]:
        """What the branch contributes to `combine_statistics` (aggregates only)."""
        del data, settings
        return {}

    @abstractmethod
    def train(
        self, data: DataT, arrays: Arrays, settings: SettingsT, ctx: RoundContext
    ) -> LocalUpdate:
        """Train the global model locally; return the arrays to send."""

    @abstractmethod
    def private_rows(self, data: DataT, settings: SettingsT) -> PrivateRows:
        """The branch's DP-SGD rows and batch, from which its noise is planned."""

    @abstractmethod
    def train_private(
        self,
        data: DataT,
        arrays: Arrays,
        settings: SettingsT,
        ctx: RoundContext,
        *,
        config: DPSGDConfig,
        plan: NoisePlan,
    ) -> PrivateUpdate:
        """Train with DP-SGD, at most ``plan.steps_per_round`` noisy steps at σ of ``plan``."""

    @abstractmethod
    def evaluate(
        self, data: DataT, arrays: Arrays, settings: SettingsT, ctx: RoundContext
    ) -> dict[str, MetricValue]:
        """Score the global model on the branch's held-out rows (aggregates only)."""

    @abstractmethod
    def dp_statement(self, settings: SettingsT) -> DPStatement:
        """What the task's DP-SGD protects (the report's privacy section)."""

    # ------------------------------------------------------------------ simulation

    @property
    def experiment(self) -> "TaskExperiment[Any, SettingsT]":
        """The task's side of a simulated experiment (`experiment_path`)."""
        module, name = self.experiment_path.split(":")
        found: TaskExperiment[Any, SettingsT] = getattr(importlib.import_module(module), name)()
        return found

    @abstractmethod
    def save_model(self, arrays: Arrays, folder: Path) -> Path:
        """Write the released model into ``folder``; return its path (hashed into the audit log)."""

    @abstractmethod
    def load_model(self, folder: Path) -> Arrays:
        """Read the model `save_model` wrote into ``folder``."""

    def commands(self) -> list[Callable[..., None]]:
        """Typer commands the task adds to ``fedcrm`` (``COMMANDS`` of `cli_path`)."""
        return list(getattr(importlib.import_module(self.cli_path), "COMMANDS", ()))

    def results_tables(self, summaries: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Rich tables of finished runs of this task (their ``summary.json``), for the CLI."""
        tables: list[Any] = importlib.import_module(self.cli_path).results_tables(summaries)
        return tables


@dataclass(frozen=True)
class SimulatedBranch:
    """A virtual branch as the researcher sees it (no customer rows).

    Attributes:
        partition_id: Its node's partition id.
        name: Its name (ledger, consent registry, manifests).
        folder: ``branches/NNN/`` of the run: its key, state and ``branch.json``.
        info: What ``branch.json`` and ``summary.json`` say about it (sizes, shares).
    """

    partition_id: int
    name: str
    folder: Path
    info: dict[str, Any]


@dataclass(frozen=True)
class SimulatedFederation:
    """What `TaskExperiment.prepare` made: the branches and the ClientApp's data handle."""

    branches: list[SimulatedBranch]
    handle: object | None
    """Passed to every simulated branch as `BranchSource.simulation` (picklable)."""
    settings: Any = None
    """The task's settings completed from the data (e.g. the catalogue size); ``None``: as given."""


@dataclass
class TaskOutcome:
    """The task's part of a finished simulated run.

    Attributes:
        summary: Keys merged into ``summary.json`` (``federated`` metrics, ``centralised``
            baselines, split sizes).
        report: The task's lines of ``report.md`` (its comparison table).
        plot: Per round, the headline metric (the plot's federated line).
        centralised: Each baseline's headline metric (the plot's dashed lines).
    """

    summary: dict[str, Any]
    report: list[str]
    plot: list[float]
    centralised: dict[str, float]


class TaskExperiment(ABC, Generic[SpecT, SettingsT]):
    """A task's side of a simulated experiment: data, centralised baselines and report.

    ``spec_type`` is a frozen dataclass of the experiment keys the task owns: top-level keys
    (``dataset``, ...) and tables (``[partition]``, ``[baselines]``, ...).
    """

    spec_type: ClassVar[type[Any]]

    def spec(self, values: Mapping[str, object], *, where: str) -> SpecT:
        """The task's experiment keys (top-level keys and tables the core does not own).

        Raises:
            ConfigError: A key is unknown or a value invalid.
        """
        parsed: SpecT = from_mapping(self.spec_type, values, where=where)
        return parsed

    def settings_defaults(self, spec: SpecT) -> dict[str, object]:
        """Task settings the data set implies (kebab-case), where ``[federation]`` is silent."""
        del spec
        return {}

    def check(self, spec: SpecT, settings: SettingsT) -> SettingsT:
        """Check the spec against the settings; return the settings completed from the data.

        Raises:
            ConfigError: They do not fit together.
        """
        del spec
        return settings

    @abstractmethod
    def prepare(
        self, spec: SpecT, settings: SettingsT, run_dir: Path, *, seed: int
    ) -> SimulatedFederation:
        """Cut the data into virtual branches under ``run_dir/branches`` (keys, ``branch.json``)."""

    @abstractmethod
    def customers(
        self,
        federation: SimulatedFederation,
        branch: SimulatedBranch,
        settings: SettingsT,
        *,
        seed: int,
    ) -> list[str]:
        """A simulated branch's customer pseudonyms, in its own order (its consent CSV's)."""

    @abstractmethod
    def subjects(
        self,
        federation: SimulatedFederation,
        branch: SimulatedBranch,
        settings: SettingsT,
        *,
        seed: int,
    ) -> dict[str, list[str]]:
        """A simulated branch's customer pseudonyms per part (``train``, ``val``, ``test``).

        The run's end gates them again for the pooled evaluation and the baselines.
        """

    @abstractmethod
    def finish(self, run: "FinishedRun[SpecT, SettingsT]") -> TaskOutcome:
        """Evaluate the released model, train the baselines, and say what the run found."""


@dataclass(frozen=True)
class FinishedRun(Generic[SpecT, SettingsT]):
    """What the core hands a task after the federated training of an experiment.

    Attributes:
        spec: The task's experiment keys.
        settings: The task's settings.
        seed: The experiment's seed.
        run_dir: The run directory.
        federation: The simulated branches.
        arrays: The released model (plaintext; replayed from ciphertext under HE).
        rounds: Every round's pooled evaluation (``RoundRecord.evaluate``).
        best_round: The released round.
        statistics: The values every message carried (the churn scaler).
        kept: Consent-gated runs: per partition id, the customers whose consent is valid at
            the run's end (empty for a branch refusing the purpose); the pooled evaluation and
            the baselines use these only. ``None``: the run was not consent-gated.
    """

    spec: SpecT
    settings: SettingsT
    seed: int
    run_dir: Path
    federation: SimulatedFederation
    arrays: Arrays
    rounds: list[dict[str, Any]]
    best_round: int
    statistics: Mapping[str, object]
    kept: Mapping[int, set[str]] | None


def float32(arrays: Mapping[str, NDArray[Any]]) -> Arrays:
    """Contiguous float32 copies (what an ArrayRecord carries for the shared models)."""
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()}
