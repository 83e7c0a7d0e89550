"""Run one experiment on Flower's simulation engine and write its run directory.

The researcher's process holds the pooled data only to cut it into branch exports and to train
the centralised baselines on the same split; the federated model itself is trained by the same
ServerApp and ClientApp that a deployment runs, on Flower's simulation engine (Ray backend).

Run directory layout::

    runs/<time>-<name>/
      config.toml          resolved experiment configuration
      branches/NNN/        one folder per virtual branch: export.parquet (pseudonymised),
                           hmac.key (0600), branch.json (name, rows, churn share)
      metrics.jsonl        one line per round (federated evaluation, pooled over branches)
      model.safetensors    final global model
      summary.json         final federated and centralised metrics (machine-readable)
      ledger.db            DP runs: the privacy ledger (SQLite), unless [dp] ledger-url
                           names another store; branches/NNN/privacy/ holds each branch's
                           persistent accountant
      report.md, auc_per_round.png
      flower.log           Flower's own log of the run
      compliance.db        consent-gated runs ([compliance]): consent registry, audit log,
                           lineage; audit-log.jsonl its signed export, audit-key.pem(.pub) the
                           run's Ed25519 key; branches/NNN/consent.csv the imported consent and
                           branches/NNN/consent/ the salts (0600) and archived manifests
"""

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
from flwr.app import Array, ArrayRecord
from flwr.clientapp.typing import Mod
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.simulation import run_simulation
from safetensors.torch import save_file

from fedcrm.client.app import branch_dir, make_client_app
from fedcrm.client.branch import BranchData, write_export
from fedcrm.client.central_dp_mod import adaptive_clipping_mod, fixed_clipping_mod
from fedcrm.client.he_mod import HEMod
from fedcrm.client.secagg_client import secagg_mod
from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.data.check import coerce_frame
from fedcrm.data.loaders import load_dataset
from fedcrm.data.partition import partition_indices
from fedcrm.data.preprocess import Scaler, combine_moments, encode, local_moments
from fedcrm.data.pseudonymise import load_or_create_key, pseudonymise_series
from fedcrm.data.schema import ChurnSchema, get_schema
from fedcrm.data.split import Split
from fedcrm.data.synthetic import synthetic_export
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.models.churn import TrainSettings, model_from_state, predict_proba
from fedcrm.models.metrics import exact_metrics
from fedcrm.privacy.branch_accounting import CentralDPMode
from fedcrm.privacy.keys import init_keys, load_public_context, load_secret_context
from fedcrm.server.app import make_server_app
from fedcrm.server.federation import (
    FederationResult,
    FederationStopped,
    RoundRecord,
    StrategyWrapper,
)
from fedcrm.server.run_audit import ComplianceConfig, RunAudit
from fedcrm.server.traffic import RoundTraffic, TrafficMeter
from fedcrm.simulation.baselines import PooledData, run_baselines
from fedcrm.simulation.config import SYNTHETIC_PREFIX, ExperimentConfig, to_toml_dict
from fedcrm.simulation.consent_setup import (
    compliance_path,
    finish_run_audit,
    gate_pooled_splits,
    setup_branch_consent,
)
from fedcrm.simulation.report import privacy_summary, write_report
from fedcrm.strategies.distributed_dp import DistributedDPStrategy
from fedcrm.strategies.guardrails import AggregationMode, RobustAggregator
from fedcrm.strategies.he import HEAggregation, replay_global_model
from fedcrm.strategies.robust import robust_strategy
from fedcrm.strategies.secagg import SecAggPlusAggregation

logger = logging.getLogger(__name__)

PhaseCallback = Callable[[str], None]


@dataclass(frozen=True)
class BranchInfo:
    """A virtual branch as the researcher sees it (no customer ids)."""

    partition_id: int
    name: str
    rows: int
    churn_share: float


def load_pooled(cfg: ExperimentConfig) -> tuple[ChurnSchema, pd.DataFrame]:
    """The pooled data set named by the experiment (real or synthetic), coerced to its schema."""
    if cfg.dataset.startswith(SYNTHETIC_PREFIX):
        schema = get_schema(cfg.schema_name)
        return schema, coerce_frame(synthetic_export(schema, cfg.rows, seed=cfg.seed), schema)
    return load_dataset(cfg.dataset)


def write_branches(cfg: ExperimentConfig, run_dir: Path) -> tuple[ChurnSchema, list[BranchInfo]]:
    """Partition the pooled data and write one pseudonymised export per branch."""
    schema, pooled = load_pooled(cfg)
    p = cfg.partition
    parts = partition_indices(
        pooled,
        kind=p.kind,
        num_branches=p.num_branches,
        column=p.column,
        label=schema.label,
        alpha=p.alpha,
        min_branch_size=p.min_branch_size,
        seed=cfg.seed,
    )
    infos = []
    for pid, part in enumerate(parts):
        folder = branch_dir(run_dir / "branches", pid)
        frame = pooled.iloc[part.indices].reset_index(drop=True)
        key = load_or_create_key(folder / "hmac.key")
        frame[schema.id_column] = pseudonymise_series(frame[schema.id_column], key)
        write_export(frame, schema, folder / "export.parquet")
        info = BranchInfo(pid, part.branch, len(frame), float(frame[schema.label].mean()))
        (folder / "branch.json").write_text(json.dumps(info.__dict__, indent=2))
        infos.append(info)
    return schema, infos


def pooled_splits(
    run_dir: Path, schema: ChurnSchema, branches: list[BranchInfo], seed: int
) -> tuple[list[Split], Scaler]:
    """Every branch's split, read back exactly as its ClientApp reads it, and the shared scaler."""
    splits = [
        BranchData(branch_dir(run_dir / "branches", b.partition_id) / "export.parquet").load(
            schema, seed=seed
        )
        for b in branches
    ]
    scaler = Scaler.from_moments(combine_moments(local_moments(s.train, schema) for s in splits))
    return splits, scaler


def _pool(splits: list[Split], schema: ChurnSchema, scaler: Scaler) -> PooledData:
    def enc(frames: list[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
        return encode(pd.concat(frames, ignore_index=True), schema, scaler)

    x_tr, y_tr = enc([s.train for s in splits])
    x_va, y_va = enc([s.val for s in splits])
    x_te, y_te = enc([s.test for s in splits])
    return PooledData(x_tr, y_tr, x_va, y_va, x_te, y_te)


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


def simulate(
    cfg: ExperimentConfig,
    run_dir: Path,
    num_branches: int,
    on_round: Callable[[RoundRecord], None] | None = None,
    traffic: TrafficMeter | None = None,
) -> FederationResult:
    """Run the federated training on Flower's simulation engine with one node per branch.

    Ray binds only to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set by
    `fedcrm._env`). Its session files end up in ``<run_dir>/ray`` (see `ray_session_dir`).

    With ``[aggregation] mode = "he"`` a key generation is created in ``<run_dir>/keys``
    (``fedcrm keys init``); branches load its secret context through `HEMod`, the server
    only the public one, and the server keeps ciphertext checkpoints in
    ``<run_dir>/checkpoints``. The researcher, who holds the key authority's files in a
    simulation as it holds the pooled data, replays them into the plaintext model at the end.
    With ``[central-dp] mode = "distributed"`` (HE only) the HE server is wrapped in
    `DistributedDPStrategy` and the branches clip and noise inside `HEMod`.
    ``robust`` replaces FedAvg by the chosen robust aggregator (plaintext mode). With
    ``mode = "secagg"`` each round's training runs inside Flower's SecAgg+ protocol
    (`SecAggPlusAggregation` on the server, `secagg_mod` on the branches).
    """
    agg = cfg.aggregation
    wrap_strategy: StrategyWrapper | None = None
    mods: list[Mod] = []
    he_servers: list[HEAggregation] = []
    distributed_dp: list[DistributedDPStrategy] = []
    central_url = (cfg.dp.ledger_url if cfg.dp else None) or sqlite_url(ledger_path(run_dir))
    compliance, trail, consent_db = None, None, None
    if cfg.compliance is not None:  # consent-gated run: consent, audit log and lineage here
        consent_db = sqlite_url(compliance_path(run_dir))
        compliance = ComplianceConfig(cfg.compliance.purpose, consent_db)
        trail = RunAudit(consent_db, run_dir.name)
    if agg.mode is AggregationMode.HE:
        keys = init_keys(run_dir / "keys")
        secret_path = keys.secret_path
        if trail is not None:
            trail.key_generation(
                key_id=keys.key_id, generation=keys.generation, params=asdict(keys.params)
            )

        def wrap_he(inner: Strategy) -> Strategy:
            server = HEAggregation(
                inner,
                public_context=load_public_context(keys.public_path),
                checkpoint_dir=run_dir / "checkpoints",
            )
            he_servers.append(server)
            ddp_cfg = cfg.central_dp
            if ddp_cfg is None or ddp_cfg.mode is not CentralDPMode.DISTRIBUTED:
                return server
            distributed = DistributedDPStrategy(
                server,
                ddp_cfg,
                rounds=cfg.federation.num_rounds,
                min_honest=cfg.min_honest_branches,
                ledger=PrivacyLedger(open_store(central_url)),
                run_id=run_dir.name,
            )
            distributed_dp.append(distributed)
            return distributed

        wrap_strategy, mods = wrap_he, [HEMod(run_dir / "keys")]
    elif agg.mode is AggregationMode.SECAGG:

        def wrap_secagg(inner: Strategy) -> Strategy:
            return SecAggPlusAggregation(inner, agg.secagg, timeout=cfg.federation.round_timeout)

        wrap_strategy, mods = wrap_secagg, [secagg_mod]
    elif agg.robust.aggregator is not RobustAggregator.NONE:

        def wrap_robust(inner: Strategy) -> Strategy:
            if not isinstance(inner, FedAvg):
                raise ConfigError(f"{agg.robust.aggregator} replaces FedAvg only")
            return robust_strategy(inner, agg.robust)

        wrap_strategy = wrap_robust
    # Guardrails: Flower's central DP never with HE, SecAgg+ or robust (distributed: HE above).
    # The ServerApp wraps the strategy (`central_dp_wrapper`), as it does when deployed.
    central_cfg = cfg.central_dp
    if central_cfg is not None and central_cfg.mode is CentralDPMode.DISTRIBUTED:
        central_cfg = None
    if central_cfg is not None and central_cfg.mode.client_side:
        mods = [
            adaptive_clipping_mod if central_cfg.mode.adaptive else fixed_clipping_mod,
            *mods,
        ]
    results: list[FederationResult] = []
    stopped: list[FederationStopped] = []
    server_app = make_server_app(
        cfg.federation,
        min_nodes=num_branches,
        on_round=on_round,
        results=results,
        dp=cfg.dp,
        central_dp=central_cfg,
        ledger_url=sqlite_url(ledger_path(run_dir)),
        run_id=run_dir.name,
        errors=stopped,
        wrap_strategy=wrap_strategy,
        compliance=compliance,
        audit=trail,
        traffic=traffic,
    )
    client_app = make_client_app(run_dir / "branches", mods=mods, consent_db=consent_db)
    with _FlowerLogToFile(run_dir / "flower.log"), ray_session_dir(run_dir) as ray_dir:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_branches,
            backend_config=_backend_config(cfg, ray_dir),
        )
    if stopped:
        raise stopped[0]
    if not results:
        raise FedCrmError(f"the federated run produced no result; see {run_dir / 'flower.log'}")
    result = results[0]
    if distributed_dp:
        result.central_dp = distributed_dp[0].summary_data.as_dict()
    server = he_servers[0] if he_servers else None
    if server is not None and server.initial is not None:
        model = replay_global_model(
            server.initial,
            server.checkpoints[: result.best_round],
            load_secret_context(secret_path),
        )
        result.state_dict = ArrayRecord(
            {n: Array(a) for n, a in model.items()}
        ).to_torch_state_dict()
    return result


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


def run_experiment(
    cfg: ExperimentConfig,
    *,
    runs_root: Path = Path("runs"),
    on_round: Callable[[RoundRecord], None] | None = None,
    on_phase: PhaseCallback | None = None,
) -> Path:
    """Run one experiment end to end and return its run directory."""
    phase = on_phase or (lambda _msg: None)
    run_dir = new_run_dir(runs_root, cfg.name)
    (run_dir / "config.toml").write_text(tomli_w.dumps(to_toml_dict(cfg)), encoding="utf-8")

    phase("writing branch exports")
    schema, branches = write_branches(cfg, run_dir)
    splits, scaler = pooled_splits(run_dir, schema, branches, cfg.federation.seed)
    pooled = _pool(splits, schema, scaler)
    consent_made_up = None
    consent_branches = [
        (b.partition_id, b.name, branch_dir(run_dir / "branches", b.partition_id)) for b in branches
    ]
    if cfg.compliance is not None:
        if cfg.aggregation.mode is AggregationMode.SECAGG:
            raise ConfigError("[compliance] with mode 'secagg' is not supported yet")
        phase("importing the branches' consent")
        consent_made_up = setup_branch_consent(
            cfg.compliance,
            consent_branches,
            url=sqlite_url(compliance_path(run_dir)),
            id_column=schema.id_column,
            seed=cfg.seed,
            now=datetime.now(UTC),
        )
    if cfg.aggregation.mode is AggregationMode.SECAGG:  # fail before Ray starts
        cfg.aggregation.secagg.check_capacity(len(branches))
        cfg.aggregation.secagg.check_weight(max(len(s.train) for s in splits))

    metrics_path = run_dir / "metrics.jsonl"

    meter = TrafficMeter()
    traffic: list[RoundTraffic] = []

    def record_round(record: RoundRecord) -> None:
        traffic.append(meter.take())
        line = {**record.__dict__, "traffic": traffic[-1].as_dict()}
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=float) + "\n")
        if on_round is not None:
            on_round(record)

    phase(f"federated training: {len(branches)} branches, {cfg.federation.num_rounds} rounds")
    t0 = time.perf_counter()
    result = simulate(cfg, run_dir, len(branches), record_round, traffic=meter)
    fed_seconds = time.perf_counter() - t0
    save_file(result.state_dict, str(run_dir / "model.safetensors"))
    compliance = None
    if cfg.compliance is not None:
        compliance = finish_run_audit(
            run_dir,
            sqlite_url(compliance_path(run_dir)),
            model_path=run_dir / "model.safetensors",
            last_round=result.best_round,
        )
        compliance["consent_imported"] = consent_made_up
        # Evaluation and baselines are processing too: the same gate, as of the run's end,
        # and the features scaled as the federated model was trained (the gated statistics).
        splits, compliance["evaluation_gate"] = gate_pooled_splits(
            cfg.compliance,
            consent_branches,
            splits,
            url=sqlite_url(compliance_path(run_dir)),
            id_column=schema.id_column,
            at=datetime.now(UTC),
        )
        pooled = _pool(splits, schema, result.scaler)

    model = model_from_state(result.state_dict)
    federated = exact_metrics(
        pooled.y_val,
        predict_proba(model, pooled.x_val),
        pooled.y_test,
        predict_proba(model, pooled.x_test),
    )

    centralised = {}
    if cfg.baselines.enabled:
        phase("centralised baselines on the same split")
        f = cfg.federation
        settings = TrainSettings(
            epochs=cfg.baselines.torch_epochs,
            batch_size=f.batch_size,
            lr=f.lr,
            weight_decay=f.weight_decay,
            optimizer="adam" if f.optimizer == "adam" else "sgd",
            momentum=f.momentum,
        )
        baselines = run_baselines(pooled, settings, seed=f.seed, hidden=f.hidden)
        centralised = {k: v.as_dict() for k, v in baselines.items()}

    summary = {
        "name": cfg.name,
        "dataset": cfg.dataset,
        "run_dir": str(run_dir),
        "branches": [b.__dict__ for b in branches],
        "rows": {
            "train": len(pooled.y_train),
            "val": len(pooled.y_val),
            "test": len(pooled.y_test),
        },
        "federated": {
            **federated.as_dict(),
            "strategy": str(cfg.federation.strategy),
            "rounds": cfg.federation.num_rounds,
            "best_round": result.best_round,
            "model_selection": "round with the best pooled validation ROC-AUC",
            "seconds": fed_seconds,
            "evaluated_on": (
                "pooled test rows of every branch (exact)"
                if cfg.compliance is None
                else "pooled test rows with valid consent at the run's end (exact)"
            ),
            "last_round": result.rounds[-1].evaluate if result.rounds else {},
            "rejected_updates": [r.__dict__ for r in result.rejections],
        },
        "centralised": centralised,
        "traffic": traffic_summary(cfg.aggregation.mode, result.rounds, traffic),
    }
    if compliance is not None:
        summary["compliance"] = compliance
    if result.dp is not None:
        summary["privacy"] = privacy_summary(
            result, ledger=result.dp.ledger_url or sqlite_url(ledger_path(run_dir))
        )
    if result.central_dp is not None:
        summary["central_dp"] = result.central_dp
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    write_report(run_dir, summary, [r.evaluate for r in result.rounds])
    phase(f"report written to {run_dir / 'report.md'}")
    return run_dir
