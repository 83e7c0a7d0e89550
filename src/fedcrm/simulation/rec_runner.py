"""Run one federated recommendation experiment on Flower's simulation engine.

The researcher's process holds the pooled interactions only to train the centralised
baselines on the same split; the federated model is trained by the recommendation ServerApp
and ClientApp (`fedcrm.server.rec_app`, `fedcrm.client.rec_app`) on Flower's simulation engine
(Ray backend), one supernode per branch. MovieLens is read from the installed ``recbole``
package on both sides and never written to the run directory.

Run directory layout::

    runs/<time>-<name>/
      config.toml                  resolved experiment configuration
      branches/<name>/branch.json  branch name, region, customer and interaction counts
      branches/<name>/user_factors.npz
                                   the branch's user factors, written by its own ClientApp
      items.npz                    final aggregated item factors and biases
      metrics.jsonl                one line per round (pooled HR@10 / NDCG@10, bytes, time)
      summary.json                 federated and centralised metrics on the same split
      report.md                    comparison table with the published (ML-1M) anchors
      flower.log                   Flower's own log of the run
"""

import functools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.simulation import run_simulation
from flwr.supercore.task_identity import TaskIdentity

from fedcrm import constants as k
from fedcrm.client.rec_app import make_rec_client_app
from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.data.interactions import Interactions, synthetic_interactions
from fedcrm.data.movielens import (
    BranchView,
    LeaveOneOutSplit,
    RecData,
    SampledNegatives,
    branch_view,
    leave_one_out,
    load_movielens_100k,
    load_or_sample_negatives,
    make_branch,
    sample_negatives,
)
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.models.rec_training import MFSettings, RankingMetrics
from fedcrm.server.rec_app import make_rec_server_app
from fedcrm.server.rec_federation import RecDPConfig, RecFederationResult, RecRoundRecord
from fedcrm.simulation.rec_baselines import centralised_baselines
from fedcrm.simulation.rec_config import RecExperimentConfig, SyntheticRecConfig, rec_to_toml_dict
from fedcrm.simulation.rec_he import replay_items, setup_rec_he
from fedcrm.simulation.rec_metrics import PUBLISHED_ANCHORS, comparison_table
from fedcrm.simulation.runner import _FlowerLogToFile, new_run_dir, ray_session_dir
from fedcrm.strategies.guardrails import AggregationMode

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.db"
"""The privacy ledger of a DP run, in the run directory."""

PhaseCallback = Callable[[str], None]


def default_negatives_dir() -> Path:
    """``$XDG_CACHE_HOME/fedcrm`` (default ``~/.cache/fedcrm``): outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedcrm"


def synthetic_rec_data(cfg: SyntheticRecConfig, *, seed: int) -> RecData:
    """Group-structured synthetic interactions, users spread over branches in uneven shares.

    Branch ``b`` gets a share proportional to ``b + 1``; every branch gets at least one user.
    ``cold_customers`` users per branch with no history are appended (``c<branch>-<j>``).
    """
    log = synthetic_interactions(
        cfg.users,
        cfg.items,
        seed=seed,
        n_groups=cfg.groups,
        per_user=(cfg.min_per_user, cfg.max_per_user),
    )
    rng = np.random.default_rng([seed, 7])
    weights = np.arange(1, cfg.branches + 1, dtype=np.float64)
    branch = rng.choice(cfg.branches, size=cfg.users, p=weights / weights.sum())
    branch[: cfg.branches] = np.arange(cfg.branches)
    cold = np.repeat(np.arange(cfg.branches), cfg.cold_customers)
    user_ids = tuple(f"u{u}" for u in range(cfg.users)) + tuple(
        f"c{b}-{j}" for b in range(cfg.branches) for j in range(cfg.cold_customers)
    )
    log = Interactions(log.user, log.item, log.timestamp, len(user_ids), log.n_items)
    return RecData(
        interactions=log,
        user_ids=user_ids,
        item_ids=tuple(f"i{i}" for i in range(cfg.items)),
        user_branch=np.concatenate([branch, cold]).astype(np.int64),
        branches=tuple(make_branch(b) for b in range(cfg.branches)),
    )


def load_rec_data(cfg: RecExperimentConfig) -> RecData:
    """The experiment's data set (MovieLens 100K from ``recbole``, or synthetic)."""
    if cfg.dataset == "synthetic":
        return synthetic_rec_data(cfg.synthetic, seed=cfg.seed)
    return load_movielens_100k()


def prepare_split(
    cfg: RecExperimentConfig, data: RecData
) -> tuple[LeaveOneOutSplit, SampledNegatives]:
    """Leave-one-out split and the fixed sampled negatives (a file per seed for real data)."""
    split = leave_one_out(data.interactions)
    if cfg.dataset == "synthetic":
        return split, sample_negatives(split, seed=cfg.seed)
    directory = cfg.negatives_dir or default_negatives_dir()
    return split, load_or_sample_negatives(directory, split, seed=cfg.seed, name=cfg.dataset)


@functools.lru_cache(maxsize=4)
def branch_views(cfg: RecExperimentConfig) -> tuple[BranchView, ...]:
    """Every branch's view of the experiment's data, in branch order (memoised per process).

    Flower's Ray backend ships the ClientApp with every message, so an instance cache would be
    rebuilt each time; this per-process memo lets a long-lived Ray worker prepare the split
    once instead of once per message.
    """
    data = load_rec_data(cfg)
    split, negatives = prepare_split(cfg, data)
    return tuple(branch_view(data, split, negatives, b.branch_id) for b in data.branches)


class RecBranches:
    """Gives each simulated node its branch view: partition id ``i`` is the ``i``-th branch."""

    def __init__(self, cfg: RecExperimentConfig) -> None:
        self.cfg = cfg

    def __call__(self, context: Context) -> BranchView:
        """Return the view of the node's branch (``partition-id`` in its node config).

        Raises:
            ConfigError: The partition id names no branch.
        """
        partition = int(context.node_config[k.NODE_PARTITION_ID])
        views = branch_views(self.cfg)
        if not 0 <= partition < len(views):
            raise ConfigError(
                f"partition-id {partition} has no branch: the data has {len(views)} branches"
            )
        return views[partition]


@contextmanager
def in_process_identity() -> Iterator[None]:
    """Set Flower's task identity (run 1, node 0) while an `InProcessGrid` run builds messages.

    Flower stamps every new `Message` with the sender's identity, which its engines set; in
    process nobody does. The previous identity is restored on exit.
    """
    names = ("_task_id", "_run_id", "_node_id")
    saved = {name: getattr(TaskIdentity, name) for name in names}
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    """A Grid that runs a ClientApp in this process, one `Context` per node (no Ray).

    For benchmarks and tests: the server loop and the ClientApp are the ones a simulation
    runs; only the transport differs. Messages are handed over as objects. Use it inside
    `in_process_identity`.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={k.NODE_PARTITION_ID: node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, num_nodes + 1)
        }

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Not used in process."""

    @property
    def run(self) -> Any:
        """Not used in process."""
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message to a node."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        """The simulated nodes."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used in process."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[str]:  # type: ignore[override]
        """Not used in process."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp and collect the replies."""
        return [self.client_app(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]


def _backend_config(cfg: RecExperimentConfig, ray_dir: Path) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": cfg.cpus_per_branch, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "_temp_dir": str(ray_dir),
        },
    }


def simulate_rec(
    cfg: RecExperimentConfig,
    run_dir: Path,
    data: RecData,
    on_round: Callable[[RecRoundRecord], None] | None = None,
) -> RecFederationResult:
    """Run the federation on Flower's simulation engine, one supernode per branch.

    A DP run records every branch's privacy report in ``ledger.db`` of the run directory.
    An HE run (``[aggregation] mode = "he"``) creates its keys in ``keys/``, the server keeps
    ciphertext checkpoints in ``checkpoints/`` and the item arrays are replayed from them with
    the secret key at the end (`fedcrm.simulation.rec_he`).
    """
    he = setup_rec_he(run_dir) if cfg.aggregation is AggregationMode.HE else None
    results: list[RecFederationResult] = []
    num = len(data.branches)
    ledger = (
        None
        if cfg.dp is None
        else PrivacyLedger(open_store(sqlite_url(str(run_dir / LEDGER_FILE))))
    )
    server_app = make_rec_server_app(
        cfg.federation,
        n_items=data.n_items,
        min_nodes=num,
        on_round=on_round,
        results=results,
        dp=cfg.dp,
        ledger=ledger,
        run_id=run_dir.name,
        he=None if he is None else he.server,
    )
    client_app = make_rec_client_app(
        RecBranches(cfg), run_dir / "branches", mods=() if he is None else (he.mod,)
    )
    with _FlowerLogToFile(run_dir / "flower.log"), ray_session_dir(run_dir) as ray_dir:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num,
            backend_config=_backend_config(cfg, ray_dir),
        )
    if not results:
        raise FedCrmError(f"the federated run produced no result; see {run_dir / 'flower.log'}")
    if he is not None:
        results[0].items = replay_items(results[0], he.keys.secret_path)
    return results[0]


def save_items(path: Path, items: dict[str, Any]) -> None:
    """Write the final item arrays (``.npz``, read back with ``allow_pickle=False``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **items)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _metrics(m: RankingMetrics) -> dict[str, float]:
    return {
        "hr10_sampled": m.hr_sampled,
        "ndcg10_sampled": m.ndcg_sampled,
        "hr10_full": m.hr_full,
        "ndcg10_full": m.ndcg_full,
        "users": float(m.count),
    }


def _from_round(values: dict[str, float]) -> RankingMetrics:
    count = int(values["users"])
    return RankingMetrics(
        k=10,
        count=count,
        hr_sampled_sum=values["hr10-sampled"] * count,
        ndcg_sampled_sum=values["ndcg10-sampled"] * count,
        hr_full_sum=values["hr10-full"] * count,
        ndcg_full_sum=values["ndcg10-full"] * count,
    )


def privacy_summary(dp: RecDPConfig, result: RecFederationResult) -> dict[str, Any]:
    """What ε covers in a DP run, and the largest cumulative ε of any branch."""
    epsilons = [eps for r in result.rounds for eps in r.epsilon.values()]
    return {
        "unit": "customer",
        "unit_note": (
            "customer-level DP-SGD on each branch's item-tower update: one customer with all "
            f"of their latest {dp.max_interactions_per_user} interactions is one clipped row "
            "(add/remove neighbours); user factors never leave the branch and are not private "
            "themselves (joint DP)"
        ),
        "epsilon_max": max(epsilons) if epsilons else 0.0,
        "target_epsilon": dp.target_epsilon,
        "delta_rule": "1/n per branch (n = its customers)" if dp.delta is None else dp.delta,
        "accountant": dp.accountant,
        "mechanism": "Poisson-subsampled Gaussian (DP-SGD), clipping norm "
        f"{dp.max_grad_norm} per customer",
        "ledger": LEDGER_FILE,
        "not_covered": "evaluation sums (HR/NDCG per branch) are released without noise",
    }


def model_label(history_length: int) -> str:
    """Name the recommender in tables: ``MF``, or ``MF+history`` with a history context."""
    return "MF+history" if history_length else "MF"


def write_rec_report(run_dir: Path, summary: dict[str, Any], table: str) -> None:
    """Write ``report.md``: the comparison table and per-round pooled metrics."""
    fed = summary["federated"]
    history = int(fed.get("history_length", 0))
    stayed = (
        f"and context factors; user factors and each customer's {history} latest items never "
        "left their branch."
        if history
        else "factors; user factors never left their branch."
    )
    lines = [
        f"# {summary['name']}: federated recommendations ({summary['dataset']})",
        "",
        f"{len(summary['branches'])} branches, {fed['rounds']} rounds of FedAvg over the item "
        + stayed
        + (
            " Encrypted aggregation (CKKS): the server added ciphertexts of the branches' item "
            "updates and never saw one in plaintext; items.npz was decrypted with the run's key."
            if summary.get("aggregation") == "he"
            else ""
        ),
        "Leave-one-out by time; HR@10 / NDCG@10 against 99 fixed sampled negatives and the full "
        "catalogue. Published anchors are on MovieLens-1M, a different and larger data set.",
        "",
        "```",
        table,
        "```",
        "",
        "| round | HR@10 | NDCG@10 | HR@10 full | NDCG@10 full | seconds | bytes/branch up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rounds"]:
        lines.append(
            f"| {r['round']} | {r['hr10']:.4f} | {r['ndcg10']:.4f} | {r['hr10_full']:.4f} "
            f"| {r['ndcg10_full']:.4f} | {r['seconds']:.2f} | {r['bytes_per_branch']:.0f} |"
        )
    (run_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_rec_experiment(
    cfg: RecExperimentConfig,
    runs_root: Path,
    on_round: Callable[[RecRoundRecord], None] | None = None,
    on_phase: PhaseCallback | None = None,
) -> Path:
    """Run a federated recommendation experiment end to end and return its run directory."""
    phase = on_phase or (lambda _msg: None)
    run_dir = new_run_dir(runs_root, cfg.name)
    (run_dir / "config.toml").write_text(tomli_w.dumps(rec_to_toml_dict(cfg)), encoding="utf-8")
    phase("preparing the leave-one-out split")
    data = load_rec_data(cfg)
    split, negatives = prepare_split(cfg, data)
    branches = []
    for branch in data.branches:
        users = data.branch_users(branch.branch_id)
        info = {
            "name": branch.name,
            "region": branch.region,
            "customers": len(users),
            "interactions": int(np.isin(data.interactions.user, users).sum()),
        }
        folder = run_dir / "branches" / branch.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "branch.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        branches.append(info)

    metrics_path = run_dir / "metrics.jsonl"

    def record_round(record: RecRoundRecord) -> None:
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(record), default=float) + "\n")
        if on_round is not None:
            on_round(record)

    fed = cfg.federation
    phase(f"federated training: {len(data.branches)} branches, {fed.num_rounds} rounds")
    t0 = time.perf_counter()
    result = simulate_rec(cfg, run_dir, data, record_round)
    seconds = time.perf_counter() - t0
    save_items(run_dir / k.REC_ITEMS_FILE, result.items)

    best = max(result.rounds, key=lambda r: r.val["hr10-sampled"])
    results: dict[str, RankingMetrics] = {}
    last = result.rounds[-1]
    results[f"federated {model_label(fed.history_length)} ({fed.num_rounds} rounds)"] = _from_round(
        last.test
    )
    centralised: dict[str, dict[str, float]] = {}
    if cfg.baselines.enabled:
        phase("centralised baselines on the same split")
        mf = MFSettings(
            factors=fed.factors,
            epochs=cfg.baselines.mf_epochs,
            lr=fed.lr,
            negatives_per_positive=fed.negatives_per_positive,
            weight_decay=fed.weight_decay,
            batch_size=fed.batch_size,
            loss=fed.loss,
            recency_halflife=fed.recency_halflife,
            history_length=fed.history_length,
        )
        # Same training data as the branches: with train-on-validation, the final fit of a
        # fixed number of epochs (chosen on validation beforehand, like the rounds).
        base = centralised_baselines(
            split.with_validation_in_train() if fed.train_on_validation else split,
            negatives,
            seed=fed.seed,
            mf=mf,
            knn_neighbours=cfg.baselines.knn_neighbours or None,
            k=fed.top_k,
            select_on_validation=not fed.train_on_validation,
        )
        centralised = {name: _metrics(m) for name, m in base.items()}
        results.update({f"centralised {name}": m for name, m in base.items()})

    rounds = [
        {
            "round": r.round,
            "hr10": r.test["hr10-sampled"],
            "ndcg10": r.test["ndcg10-sampled"],
            "hr10_full": r.test["hr10-full"],
            "ndcg10_full": r.test["ndcg10-full"],
            "val_hr10": r.val["hr10-sampled"],
            "seconds": r.seconds,
            "bytes_per_branch": float(np.mean(list(r.bytes_up.values()))) if r.bytes_up else 0.0,
        }
        for r in result.rounds
    ]
    summary: dict[str, Any] = {
        "name": cfg.name,
        "task": "recommendation",
        "dataset": cfg.dataset,
        "aggregation": str(cfg.aggregation),
        "run_dir": str(run_dir),
        "branches": branches,
        "split": {
            "train_interactions": len(split.train),
            "evaluated_users": len(split.eval_users),
            "items": data.n_items,
            "negatives_seed": cfg.seed,
        },
        "federated": {
            **_metrics(_from_round(last.test)),
            "rounds": fed.num_rounds,
            "seconds": seconds,
            "model": "last round (item arrays in items.npz, user factors in each branch folder)",
            "round_seconds_mean": float(np.mean([r.seconds for r in result.rounds])),
            "bytes_up_per_branch_per_round": rounds[-1]["bytes_per_branch"],
            "best_val_round": {
                "round": best.round,
                **_metrics(_from_round(best.test)),
                "note": "metrics only; the saved model is the last round's"
                + (
                    " (validation items were trained on: not a held-out choice)"
                    if fed.train_on_validation
                    else ""
                ),
            },
            "train_on_validation": fed.train_on_validation,
            "history_length": fed.history_length,
        },
        "centralised": centralised,
        "rounds": rounds,
        "anchors": [{**asdict(a), "note": "published, ML-1M"} for a in PUBLISHED_ANCHORS],
    }
    if cfg.dp is not None:
        summary["privacy"] = privacy_summary(cfg.dp, result)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    table = comparison_table(results, data="ML-100K" if cfg.dataset != "synthetic" else "synth")
    write_rec_report(run_dir, summary, table)
    if math.isnan(summary["federated"]["hr10_sampled"]):
        logger.warning("no evaluated users: the federated metrics are undefined")
    phase(f"report written to {run_dir / 'report.md'}")
    return run_dir
