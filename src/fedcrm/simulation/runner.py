"""Run one experiment of any task on Flower's simulation engine and write its run directory.

The researcher's process holds the pooled data only to cut it into virtual branches and, after
the run, to train the centralised baselines on the same split (the task's experiment:
`fedcrm.tasks.TaskExperiment`); the federated model itself is trained by the same ServerApp and
ClientApp that a deployment runs, on Flower's simulation engine (Ray backend, loopback only).

Run directory layout::

    runs/<time>-<name>/
      config.toml          resolved experiment configuration
      branches/NNN/        one folder per virtual branch: branch.json (name, sizes), hmac.key
                           (0600), the task's data (churn: export.parquet, pseudonymised) and
                           state (recommendation: user_factors.npz); privacy/ the branch's
                           persistent accountants; consent.csv and consent/ in gated runs
      metrics.jsonl        one line per round (pooled federated evaluation, traffic)
      model.safetensors    churn: the released model; items.npz for recommendations
      summary.json         federated and centralised metrics (machine-readable)
      report.md, metric_per_round.png
      ledger.db            DP runs: the privacy ledger (SQLite), unless [dp] ledger-url names
                           another store ([dp] privacy-store keeps the branches' accountants
                           across runs: <store>/<branch>/)
      rounds/              the coordinator's state after every round (`fedcrm resume RUN_DIR`)
      keys/, checkpoints/  HE runs: the run's CKKS keys and the server's ciphertext checkpoints
      compliance.db        consent-gated runs ([compliance]): consent registry, audit log,
                           lineage; audit-log.jsonl its signed export, audit-key.pem(.pub) the
                           run's Ed25519 key
      flower.log, ray/     Flower's log and Ray's session files (branch logs included)
"""

import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from flwr.clientapp.typing import Mod
from flwr.simulation import run_simulation

from fedcrm.client.app import make_client_app
from fedcrm.client.central_dp_mod import adaptive_clipping_mod, fixed_clipping_mod
from fedcrm.client.he_mod import HEMod
from fedcrm.client.secagg_client import secagg_mod
from fedcrm.compliance import sqlite_url
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy import CentralDPMode
from fedcrm.privacy.keys import KeyGeneration, init_keys, load_public_context, load_secret_context
from fedcrm.server import RoundCheckpoints
from fedcrm.server.app import make_server_app
from fedcrm.server.result import FederationResult, FederationStopped, RoundRecord
from fedcrm.server.run_audit import ComplianceConfig, RunAudit
from fedcrm.server.traffic import RoundTraffic, TrafficMeter
from fedcrm.server.wiring import Wiring
from fedcrm.simulation.config import ExperimentConfig, to_toml_dict
from fedcrm.simulation.consent_setup import (
    compliance_path,
    finish_run_audit,
    gate_branches,
    setup_branch_consent,
)
from fedcrm.simulation.report import privacy_summary, write_report
from fedcrm.strategies.guardrails import AggregationMode
from fedcrm.strategies.he import replay_global_model
from fedcrm.tasks import Arrays, FinishedRun, SimulatedFederation

logger = logging.getLogger(__name__)

ROUNDS_DIR = "rounds"
"""The coordinator's round checkpoints in a run directory (`fedcrm resume` goes on from them)."""
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
PhaseCallback = Callable[[str], None]
RoundHook = Callable[[RoundRecord], None]


def _backend_config(cfg: ExperimentConfig, ray_dir: Path) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": cfg.cpus_per_branch, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "num_gpus": 0,
            "include_dashboard": False,
            # Branch processes log into <run_dir>/ray/.../logs, not onto the researcher's console.
            "log_to_driver": False,
            "_temp_dir": str(ray_dir),
        },
    }


class _FlowerLogToFile:
    """Send Flower's console log to a file for the duration of a run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.logger = logging.getLogger("flwr")
        self.removed: list[logging.Handler] = []
        self.propagate = True
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> None:
        self.removed = [h for h in self.logger.handlers if isinstance(h, logging.StreamHandler)]
        for h in self.removed:
            self.logger.removeHandler(h)
        self.logger.addHandler(self.handler)
        self.propagate, self.logger.propagate = self.logger.propagate, False

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.propagate
        self.handler.close()
        for h in self.removed:
            self.logger.addHandler(h)


def client_mods(cfg: ExperimentConfig, key_dir: Path | None) -> list[Mod]:
    """The branches' mods the experiment's aggregation and branch-level DP ask for.

    Client-side clipping comes first (it is the last to touch the update); the HE mod or the
    SecAgg+ mod sits inside it, next to the network.
    """
    mods: list[Mod] = []
    central = cfg.central_dp
    if central is not None and central.mode.client_side:
        mods.append(adaptive_clipping_mod if central.mode.adaptive else fixed_clipping_mod)
    if key_dir is not None:
        mods.append(HEMod(key_dir))
    elif cfg.aggregation.mode is AggregationMode.SECAGG:
        mods.append(secagg_mod)
    return mods


def simulate(
    cfg: ExperimentConfig,
    run_dir: Path,
    federation: SimulatedFederation,
    settings: object,
    *,
    on_round: RoundHook | None = None,
    traffic: TrafficMeter | None = None,
    audit: RunAudit | None = None,
) -> tuple[FederationResult, Wiring, KeyGeneration | None]:
    """Run the federated training on Flower's simulation engine with one node per branch.

    Ray binds only to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set by
    `fedcrm._env`); its session files end up in ``<run_dir>/ray`` (see `ray_session_dir`).
    With ``[aggregation] mode = "he"`` a key generation is created in ``<run_dir>/keys``
    (``fedcrm keys init``): branches load its secret context through `HEMod`, the server only
    the public one, and the server keeps ciphertext checkpoints in ``<run_dir>/checkpoints``.

    Returns:
        The result, the wiring (its HE server holds the checkpoints) and the run's keys.

    Raises:
        FederationStopped: Consent or budgets left too few branches, or the ledger refused.
        FedCrmError: The run produced no result (Flower's log says why).
    """
    keys = None
    public = None
    if cfg.aggregation.mode is AggregationMode.HE:
        keys = init_keys(run_dir / "keys")
        public = load_public_context(keys.public_path)
        if audit is not None:
            audit.key_generation(
                key_id=keys.key_id, generation=keys.generation, params=asdict(keys.params)
            )
    ledger = (cfg.dp.ledger_url if cfg.dp else None) or sqlite_url(ledger_path(run_dir))
    wiring = Wiring(
        cfg.aggregation,
        cfg.central_dp,
        rounds=cfg.federation.num_rounds,
        run_id=run_dir.name,
        ledger_url=ledger,
        round_timeout=cfg.federation.round_timeout,
        public_context=public,
        checkpoint_dir=run_dir / "checkpoints" if keys is not None else None,
        min_honest=cfg.min_honest_branches,
    )
    consent_db = None if cfg.compliance is None else sqlite_url(compliance_path(run_dir))
    results: list[FederationResult] = []
    stopped: list[FederationStopped] = []
    server_app = make_server_app(
        cfg.federation,
        settings,
        min_nodes=len(federation.branches),
        on_round=on_round,
        results=results,
        wiring=wiring,
        dp=cfg.dp,
        ledger_url=ledger,
        run_id=run_dir.name,
        errors=stopped,
        compliance=ComplianceConfig(
            None if cfg.compliance is None else cfg.compliance.purpose, consent_db
        ),
        audit=audit,
        traffic=traffic,
        checkpoint_dir=run_dir / ROUNDS_DIR,
    )
    client_app = make_client_app(
        run_dir / "branches",
        simulation=federation.handle,
        mods=client_mods(cfg, None if keys is None else run_dir / "keys"),
        consent_db=consent_db,
    )
    with _FlowerLogToFile(run_dir / "flower.log"), ray_session_dir(run_dir) as ray_dir:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(federation.branches),
            backend_config=_backend_config(cfg, ray_dir),
        )
    if stopped:
        raise stopped[0]
    if not results:
        raise FedCrmError(f"the federated run produced no result; see {run_dir / 'flower.log'}")
    return results[0], wiring, keys


def released_model(result: FederationResult, wiring: Wiring, keys: KeyGeneration | None) -> Arrays:
    """The released model in plaintext: under HE, the key holder replays the checkpoints.

    In a simulation the researcher holds the key authority's files, as it holds the pooled
    data; the replay is exactly what every branch holds after the released round.
    """
    server = wiring.he
    if server is None or keys is None:
        return result.arrays
    if server.initial is None:
        raise FedCrmError("the HE run sent no initial model; nothing to replay")
    model = replay_global_model(
        server.initial,
        server.checkpoints[: result.best_round],
        load_secret_context(keys.secret_path),
    )
    return {name: np.asarray(a, dtype=np.float32) for name, a in model.items()}


def _check_branches(cfg: ExperimentConfig, federation: SimulatedFederation) -> None:
    """Refuse before Ray starts what the number of branches makes impossible.

    Raises:
        ConfigError: Distributed DP's ``K_min`` exceeds the branches, or SecAgg+ cannot sum
            them without wrapping around its modulus.
    """
    count = len(federation.branches)
    central = cfg.central_dp
    distributed = central is not None and central.mode is CentralDPMode.DISTRIBUTED
    if distributed and cfg.min_honest_branches > count:
        raise ConfigError(
            f"[central-dp] min-honest-branches (K_min = {cfg.min_honest_branches}, default "
            f"min-train-nodes) exceeds the {count} branches: no round could be released"
        )
    if cfg.aggregation.mode is AggregationMode.SECAGG:
        cfg.aggregation.secagg.check_capacity(count)


def traffic_summary(
    mode: AggregationMode, rounds: list[RoundRecord], traffic: list[RoundTraffic]
) -> dict[str, Any]:
    """Median bytes per branch per round (train + evaluate messages) and median round time."""

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else float("nan")

    return {
        "aggregation": str(mode),
        "bytes_up_per_branch_per_round": median([t.up_per_branch for t in traffic]),
        "bytes_down_per_branch_per_round": median([t.down_per_branch for t in traffic]),
        "median_round_seconds": median([r.seconds for r in rounds]),
        "measured": "protobuf bytes of every train and evaluate message, medians over rounds",
    }


def use_privacy_store(federation: SimulatedFederation, store: Path) -> None:
    """Point every virtual branch at its accountants in the shared store (``<store>/<name>/``).

    The branch's ``branch.json`` names the folder; its accountants there outlive the run, so
    the next run of the same branches starts at the ε they have spent.
    """
    for branch in federation.branches:
        info_path = branch.folder / "branch.json"
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info["privacy-dir"] = str(store / _SAFE_NAME.sub("_", branch.name))
        info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")


def ledger_path(run_dir: Path) -> Path:
    """The run's privacy ledger (SQLite) unless ``[dp] ledger-url`` names another store."""
    return run_dir / "ledger.db"


_AF_UNIX_PATH_MAX = 107
_RAY_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")


@contextmanager
def ray_session_dir(run_dir: Path) -> Iterator[Path]:
    """Give Ray a temporary folder whose contents end up in ``<run_dir>/ray``.

    Ray puts Unix sockets under its temporary folder, and a socket path may not exceed 107
    bytes. When ``<run_dir>/ray`` is short enough Ray uses it directly; otherwise Ray runs in a
    private (0700) folder under the system temp dir, which is moved into the run directory
    (sockets excluded) once the simulation has ended.
    """
    target = run_dir.resolve() / "ray"
    if len(str(target)) + _RAY_SOCKET_SUFFIX <= _AF_UNIX_PATH_MAX:
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    short = Path(tempfile.mkdtemp(prefix="fedcrm-ray-"))
    try:
        yield short
    finally:
        for link in short.iterdir():  # a resumed run's Ray session replaces session_latest
            if link.is_symlink() and (target / link.name).is_symlink():
                (target / link.name).unlink()
        shutil.copytree(short, target, ignore=_sockets, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(short, ignore_errors=True)


def _sockets(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(folder, n)).st_mode)}


def new_run_dir(runs_root: Path, name: str) -> Path:
    """Create ``runs_root/<UTC time>-<name>`` (unique)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = runs_root / f"{stamp}-{name}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_root / f"{stamp}-{name}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def resume_experiment(
    run_dir: Path, *, on_round: RoundHook | None = None, on_phase: PhaseCallback | None = None
) -> Path:
    """Resume a stopped run in its own directory after its last completed round.

    The run's ``config.toml`` is the experiment; the branches are prepared again (their keys,
    accountants and consent are kept), the statistics query reconciles the ledger with the
    branches' accountants, and training goes on from ``rounds/`` (`RoundCheckpoints`).

    Raises:
        ConfigError: The folder is not a run directory, holds no round checkpoint, or the run
            cannot resume (HE, FedAdam, complete).
    """
    from fedcrm.simulation.config import load_experiment

    cfg = load_experiment(run_dir / "config.toml")
    if cfg.aggregation.mode is AggregationMode.HE:
        raise ConfigError("an HE run cannot resume yet: start it afresh")
    if RoundCheckpoints(run_dir / ROUNDS_DIR, run_dir.name).load() is None:
        raise ConfigError(f"{run_dir} has no round checkpoint to resume from ({ROUNDS_DIR}/)")
    return run_experiment(cfg, resume=run_dir, on_round=on_round, on_phase=on_phase)


def run_experiment(
    cfg: ExperimentConfig,
    *,
    runs_root: Path = Path("runs"),
    on_round: RoundHook | None = None,
    on_phase: PhaseCallback | None = None,
    resume: Path | None = None,
) -> Path:
    """Run one experiment end to end (or resume it in ``resume``); return its run directory."""
    phase = on_phase or (lambda _msg: None)
    task, experiment = cfg.plugin, cfg.plugin.experiment
    run_dir = resume or new_run_dir(runs_root, cfg.name)
    phase("preparing the branches")
    federation = experiment.prepare(cfg.spec, cfg.settings, run_dir, seed=cfg.seed)
    settings = federation.settings or cfg.settings
    resolved = replace(cfg, settings=settings)
    if resume is None:
        config_text = tomli_w.dumps(to_toml_dict(resolved))
        (run_dir / "config.toml").write_text(config_text, encoding="utf-8")
    _check_branches(cfg, federation)
    if cfg.dp is not None and cfg.privacy_store is not None:
        use_privacy_store(federation, cfg.privacy_store)
    seed = cfg.federation.seed
    trail, consent_made_up = None, None
    if cfg.compliance is not None and resume is not None:  # consent was imported at the start
        trail = RunAudit(sqlite_url(compliance_path(run_dir)), run_dir.name)
    elif cfg.compliance is not None:  # consent-gated run: consent, audit log and lineage here
        phase("importing the branches' consent")
        url = sqlite_url(compliance_path(run_dir))
        consent_made_up = setup_branch_consent(
            cfg.compliance,
            [
                (b, experiment.customers(federation, b, settings, seed=seed))
                for b in federation.branches
            ],
            url=url,
            seed=cfg.seed,
            now=datetime.now(UTC),
        )
        trail = RunAudit(url, run_dir.name)

    metrics_path = run_dir / "metrics.jsonl"
    if resume is not None:  # keep the lines of the rounds the checkpoint holds
        saved = RoundCheckpoints(run_dir / ROUNDS_DIR, run_dir.name).load()
        last = 0 if saved is None else saved.last_round
        lines = (
            metrics_path.read_text(encoding="utf-8").splitlines() if metrics_path.exists() else []
        )
        kept_lines = [x for x in lines if json.loads(x)["round"] <= last]
        metrics_path.write_text("".join(x + "\n" for x in kept_lines), encoding="utf-8")
    meter = TrafficMeter()
    traffic: list[RoundTraffic] = []

    def record_round(record: RoundRecord) -> None:
        traffic.append(meter.take())
        line = {**asdict(record), "traffic": traffic[-1].as_dict()}
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=float) + "\n")
        if on_round is not None:
            on_round(record)

    rounds = cfg.federation.num_rounds
    phase(f"federated training: {len(federation.branches)} branches, {rounds} rounds")
    t0 = time.perf_counter()
    result, wiring, keys = simulate(
        resolved, run_dir, federation, settings, on_round=record_round, traffic=meter, audit=trail
    )
    seconds = time.perf_counter() - t0
    arrays = released_model(result, wiring, keys)
    model_path = task.save_model(arrays, run_dir)
    compliance: dict[str, Any] | None = None
    kept = None
    if cfg.compliance is not None:
        url = sqlite_url(compliance_path(run_dir))
        compliance = finish_run_audit(
            run_dir,
            url,
            model_path=model_path,
            model=task.model_name,
            last_round=result.best_round,
        )
        compliance["consent_imported"] = consent_made_up
        # Evaluation and baselines are processing too: the same gate, as of the run's end.
        kept, compliance["evaluation_gate"] = gate_branches(
            cfg.compliance,
            [
                (b, experiment.subjects(federation, b, settings, seed=seed))
                for b in federation.branches
            ],
            url=url,
            at=datetime.now(UTC),
        )
    phase("scoring the released model and the centralised baselines on the same split")
    outcome = experiment.finish(
        FinishedRun(
            spec=cfg.spec,
            settings=settings,
            seed=seed,
            run_dir=run_dir,
            federation=federation,
            arrays=arrays,
            rounds=[r.evaluate for r in result.rounds],
            best_round=result.best_round,
            statistics=result.statistics,
            kept=kept,
        )
    )
    label, _ = task.headline(settings)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "task": task.name,
        "run_dir": str(run_dir),
        **{key: v for key, v in outcome.summary.items() if key != "federated"},
        "branches": [b.info for b in federation.branches],
        "federated": {
            **outcome.summary.get("federated", {}),
            "strategy": str(cfg.federation.strategy),
            "rounds": rounds,
            "best_round": result.best_round,
            "model_selection": (
                f"round with the best pooled {selection}"
                if (selection := task.selection_metric(settings))
                else "the last round"
            ),
            "seconds": seconds,
            "last_round": result.rounds[-1].evaluate if result.rounds else {},
            "rejected_updates": [asdict(r) for r in result.rejections],
        },
        "traffic": traffic_summary(cfg.aggregation.mode, result.rounds, traffic),
    }
    if compliance is not None:
        summary["compliance"] = compliance
    if result.dp is not None:
        summary["privacy"] = privacy_summary(
            result,
            ledger=result.dp.ledger_url or sqlite_url(ledger_path(run_dir)),
            statement=task.dp_statement(settings),
        )
    if result.central_dp is not None:
        summary["central_dp"] = result.central_dp
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    write_report(
        run_dir,
        summary,
        outcome.report,
        plot=outcome.plot,
        centralised=outcome.centralised,
        label=label,
    )
    phase(f"report written to {run_dir / 'report.md'}")
    return run_dir
