"""The recommendation task: matrix factorisation whose user factors never leave the branch.

Per round a branch restores its user factors from ``Context.state``, loads the server's item
arrays, trains locally, keeps the new user factors (in ``Context.state`` and in its folder,
for serving) and replies with the item arrays only.

Notes:
    User factors describe a branch's customers (Ammad-ud-din et al. 2019, arXiv:1901.09888).
    They never enter a message: the reply is built from `shared_state`, which reads only the
    model's item tower, and the server's reply validation drops any reply with other keys.
"""

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from numpy.typing import NDArray

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_private import fit_user_factors, train_items_private, user_rows
from fedcrm.models.rec_training import evaluate_branch, train_branch
from fedcrm.models.recommender import (
    MatrixFactorisation,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)
from fedcrm.privacy import DPSGDConfig, NoisePlan
from fedcrm.tasks.base import (
    Arrays,
    BranchSource,
    DPStatement,
    LocalUpdate,
    MetricValue,
    PrivateRows,
    PrivateUpdate,
    RoundContext,
    Task,
)
from fedcrm.tasks.recommendation.data import (
    RecBranch,
    RecSimulation,
    deployed_branch,
    simulated_branch,
)
from fedcrm.tasks.recommendation.metrics import aggregate_ranking, to_record
from fedcrm.tasks.recommendation.settings import RecSettings

logger = logging.getLogger(__name__)

DP_LR: Final = 1.0
"""SGD learning rate of the private item-tower step (`train_items_private`)."""
UNIT_NOTE: Final = (
    "customer-level DP-SGD on the item tower: each customer's latest interactions (capped) "
    "form one clipped row; user factors stay on the branch (joint DP)"
)


def save_arrays(path: Path, arrays: Mapping[str, NDArray[Any]]) -> None:
    """Write named arrays atomically (``.npz``, read back with ``allow_pickle=False``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_arrays(path: Path) -> dict[str, NDArray[np.float32]]:
    """Read arrays written by `save_arrays`."""
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key].astype(np.float32) for key in stored.files}


def _training_split(data: RecBranch, settings: RecSettings) -> RecBranch:
    """The split as this run trains on it (with the validation items in a final fit)."""
    if not settings.train_on_validation:
        return data
    return RecBranch(data.customers, data.split.with_validation_in_train(), data.negatives)


class RecommendationTask(Task[RecSettings, RecBranch]):
    """Federated MF (with an optional history context) over the shared item catalogue."""

    name = "recommendation"
    settings_type = RecSettings
    model_name = "recommender"
    purpose = "recommendation-training"
    dp_keys = frozenset({"users-per-step", "max-interactions-per-user"})
    experiment_path = "fedcrm.tasks.recommendation.experiment:RecExperiment"
    cli_path = "fedcrm.tasks.recommendation.cli"
    model_file = k.REC_ITEMS_FILE

    # ------------------------------------------------------------------ server side

    def initial_arrays(self, settings: RecSettings, *, seed: int) -> Arrays:
        """The seeded item tower, identical to every branch's own initialisation."""
        if settings.num_items < 1:
            raise ConfigError("num-items must name the size of the shared item catalogue")
        model = MatrixFactorisation(
            1, settings.num_items, settings.factors, context=settings.history_length, seed=seed
        )
        return dict(shared_state(model))

    def aggregate_evaluation(
        self, settings: RecSettings, records: list[RecordDict], weight_key: str
    ) -> MetricRecord:
        """Pooled HR@k and NDCG@k (sampled and full catalogue), test and ``val-``."""
        return aggregate_ranking(records, settings.top_k)

    def selection_metric(self, settings: RecSettings) -> str | None:
        """Validation HR@k; the last round when the validation items were trained on."""
        return None if settings.train_on_validation else f"val-hr{settings.top_k}-sampled"

    def headline(self, settings: RecSettings) -> tuple[str, str]:
        """Pooled test HR@k against the sampled negatives."""
        return f"HR@{settings.top_k}", f"hr{settings.top_k}-sampled"

    # ------------------------------------------------------------------ branch side

    def load(self, source: BranchSource, settings: RecSettings, *, seed: int) -> RecBranch:
        """The branch's share of the simulated data set, or its own export (deployment).

        Raises:
            ConfigError: A deployed node names no catalogue.
        """
        if source.data_path is None:
            if not isinstance(source.simulation, RecSimulation):
                raise ConfigError(
                    "this SuperNode has no data: start it with --node-config "
                    '\'data-path="/srv/crm/interactions.csv" catalogue-path="/srv/crm/items.txt"\''
                )
            return simulated_branch(source.simulation, source.number, source.key)
        catalogue = source.node_config.get(k.NODE_CATALOGUE_PATH)
        if not catalogue:
            raise ConfigError(
                f"a recommendation branch needs node config {k.NODE_CATALOGUE_PATH!r}: the "
                "federation's item catalogue (one item id per line)"
            )
        return deployed_branch(
            source.data_path,
            Path(str(catalogue)),
            key=source.key,
            num_items=settings.num_items,
            seed=seed,
        )

    def _model(
        self, data: RecBranch, arrays: Arrays, settings: RecSettings, ctx: RoundContext
    ) -> MatrixFactorisation:
        model = MatrixFactorisation(
            len(data.customers),
            data.split.n_items,
            settings.factors,
            context=settings.history_length,
            seed=ctx.run_seed,
        )
        saved = ctx.state.array_records.get(k.STATE_REC_USER_FACTORS)
        if saved is not None:
            load_local_state(model, {key: a.numpy() for key, a in saved.items()})
        load_shared_state(model, arrays)
        return model

    def _keep_user_factors(self, model: MatrixFactorisation, ctx: RoundContext) -> None:
        users = local_state(model)
        ctx.state.array_records[k.STATE_REC_USER_FACTORS] = ArrayRecord(
            {key: Array(np.ascontiguousarray(a)) for key, a in users.items()}
        )
        save_arrays(ctx.folder / k.REC_USER_FACTORS_FILE, users)

    def train(
        self, data: RecBranch, arrays: Arrays, settings: RecSettings, ctx: RoundContext
    ) -> LocalUpdate:
        """Local epochs of both towers; the user factors stay here."""
        model = self._model(data, arrays, settings, ctx)
        train = _training_split(data, settings).split.train
        out = train_branch(model, train, **settings.local_fit(seed=ctx.seed))
        self._keep_user_factors(model, ctx)
        loss = out.final_loss if out.epoch_losses else 0.0
        return LocalUpdate(dict(shared_state(model)), out.num_examples, {k.KEY_TRAIN_LOSS: loss})

    def private_rows(self, data: RecBranch, settings: RecSettings) -> PrivateRows:
        """One DP-SGD row per customer with training interactions (customer-level DP)."""
        customers = len(np.unique(_training_split(data, settings).split.train.user))
        return PrivateRows(
            rows=customers,
            batch_size=min(settings.users_per_step, customers),
            epochs=settings.local_epochs,
            unit="customer",
            note=UNIT_NOTE,
        )

    def train_private(
        self,
        data: RecBranch,
        arrays: Arrays,
        settings: RecSettings,
        ctx: RoundContext,
        *,
        config: DPSGDConfig,
        plan: NoisePlan,
    ) -> PrivateUpdate:
        """Fit the user factors locally, then customer-level DP-SGD on the item tower.

        Raises:
            ConfigError: The customer rows differ from those the noise was planned for.
        """
        model = self._model(data, arrays, settings, ctx)
        train = _training_split(data, settings).split.train
        rows = user_rows(
            train,
            cap=settings.max_interactions_per_user,
            negatives_per_positive=settings.negatives_per_positive,
            rng=np.random.default_rng(ctx.seed),
            history=model.context_length,
        )
        planned = self.private_rows(data, settings).rows
        if len(rows) != planned:
            raise ConfigError(f"{len(rows)} customer rows, the noise was planned for {planned}")
        fit_user_factors(model, train, **settings.local_fit(seed=ctx.seed))
        _, event = train_items_private(
            model,
            rows,
            lr=DP_LR,
            batch_size=plan.batch_size,
            epochs=settings.local_epochs,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            max_steps=plan.steps_per_round,
        )
        self._keep_user_factors(model, ctx)
        return PrivateUpdate(dict(shared_state(model)), len(rows), event)

    def evaluate(
        self, data: RecBranch, arrays: Arrays, settings: RecSettings, ctx: RoundContext
    ) -> dict[str, MetricValue]:
        """HR@k and NDCG@k sums of the branch's users, test and validation items."""
        if k.STATE_REC_USER_FACTORS not in ctx.state.array_records:
            logger.warning("evaluating before any training: user factors are untrained")
        model = self._model(data, arrays, settings, ctx)
        split = _training_split(data, settings)
        at = settings.top_k
        test = evaluate_branch(model, split.split, split.negatives, target="test", k=at)
        val = evaluate_branch(model, split.split, split.negatives, target="val", k=at)
        values: dict[str, MetricValue] = dict(to_record(test))
        values.update({k.REC_VAL_PREFIX + key: v for key, v in to_record(val).items()})
        values[k.KEY_NUM_EXAMPLES] = test.count
        return values

    def dp_statement(self, settings: RecSettings) -> DPStatement:
        """Customer-level DP-SGD on the item tower (joint DP for the user factors)."""
        return DPStatement(
            mechanism="user-level DP-SGD (McMahan et al. 2018, arXiv:1710.06963): "
            "Poisson-subsampled Gaussian, per-customer clipping",
            relation="add/remove one customer with all of their interactions",
            unit_note="customer-level DP-SGD on each branch's item-tower update: one customer "
            f"with their latest {settings.max_interactions_per_user} interactions is one "
            "clipped row; user factors never leave the branch and are not private themselves "
            "(joint DP)",
            not_covered="the statistics query's counts and the evaluation sums (HR/NDCG per "
            "branch) are released without noise",
        )

    # ------------------------------------------------------------------ simulation

    def save_model(self, arrays: Arrays, folder: Path) -> Path:
        """``items.npz``: the item factors, biases and history weights the branches serve from."""
        path = folder / k.REC_ITEMS_FILE
        save_arrays(path, arrays)
        return path

    def load_model(self, folder: Path) -> Arrays:
        """The arrays of ``items.npz``."""
        return dict(load_arrays(folder / k.REC_ITEMS_FILE))
