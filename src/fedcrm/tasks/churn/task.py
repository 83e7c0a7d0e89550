"""The churn task: a tabular MLP on each branch's CRM export, scaled by federated statistics."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from safetensors.numpy import load_file, save_file

from fedcrm import wire as k
from fedcrm.data.preprocess import Moments, Scaler, combine_moments
from fedcrm.data.schema import get_schema
from fedcrm.exceptions import ConfigError, InconsistentReplies
from fedcrm.models.churn import build_model, model_from_state
from fedcrm.privacy import DPSGDConfig, NoisePlan
from fedcrm.settings import Value
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
    float32,
)
from fedcrm.tasks.churn import branch
from fedcrm.tasks.churn.branch import ChurnData
from fedcrm.tasks.churn.metrics import aggregate_churn_evaluation
from fedcrm.tasks.churn.settings import ChurnSettings

MODEL_FILE: Final = "model.safetensors"
"""The released churn model in a run directory (safetensors, the best validation round)."""


def scaler_from(config: Mapping[str, object]) -> Scaler:
    """The federated scaler every train and evaluate message carries.

    Raises:
        ConfigError: The message carries no (or a malformed) scaler.
    """
    mean, std = config.get(k.KEY_SCALER_MEAN), config.get(k.KEY_SCALER_STD)
    if not isinstance(mean, list) or not isinstance(std, list) or len(mean) != len(std):
        raise ConfigError("server message lacks the federated scaler")
    return Scaler(np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64))


def _torch(arrays: Arrays) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(a)) for name, a in arrays.items()}


def _numpy(state: Mapping[str, torch.Tensor]) -> Arrays:
    return {name: t.detach().cpu().numpy() for name, t in state.items()}


class ChurnTask(Task[ChurnSettings, ChurnData]):
    """Churn on tabular exports (Telco, MLC): FedAvg, FedProx or FedAdam over an MLP."""

    name = "churn"
    settings_type = ChurnSettings
    model_name = "churn"
    purpose = "churn-model-training"
    strategies = frozenset({"fedavg", "fedprox", "fedadam"})
    experiment_path = "fedcrm.tasks.churn.experiment:ChurnExperiment"
    cli_path = "fedcrm.tasks.churn.cli"
    model_file = MODEL_FILE

    # ------------------------------------------------------------------ server side

    def initial_arrays(self, settings: ChurnSettings, *, seed: int) -> Arrays:
        """The seeded MLP every branch starts from."""
        schema = get_schema(settings.schema)
        model = build_model(schema.input_dim, seed=seed, hidden=settings.hidden)
        return _numpy(model.state_dict())

    def combine_statistics(
        self, settings: ChurnSettings, records: Sequence[MetricRecord]
    ) -> dict[str, Value | list[float]]:
        """The shared scaler from the branches' moments (counts, sums, sums of squares).

        Raises:
            InconsistentReplies: A reply's moments are malformed.
        """
        width = len(get_schema(settings.schema).numeric)
        parts: list[Moments] = []
        for record in records:
            values = record.get(k.KEY_MOMENTS)
            if not isinstance(values, list):
                raise InconsistentReplies("a statistics reply carries no moments")
            parts.append(Moments.from_list([float(v) for v in values], width))
        scaler = Scaler.from_moments(combine_moments(parts))
        return {
            k.KEY_SCALER_MEAN: [float(v) for v in scaler.mean],
            k.KEY_SCALER_STD: [float(v) for v in scaler.std],
        }

    def aggregate_evaluation(
        self, settings: ChurnSettings, records: list[RecordDict], weight_key: str
    ) -> MetricRecord:
        """Pooled ROC-AUC, PR-AUC, F1 and log loss from the branches' score histograms."""
        return aggregate_churn_evaluation(records, weight_key)

    def selection_metric(self, settings: ChurnSettings) -> str:
        """The round with the best pooled validation ROC-AUC is released."""
        return "val-roc-auc"

    def headline(self, settings: ChurnSettings) -> tuple[str, str]:
        """Pooled test ROC-AUC."""
        return "AUC", "roc-auc"

    # ------------------------------------------------------------------ branch side

    def load(self, source: BranchSource, settings: ChurnSettings, *, seed: int) -> ChurnData:
        """The branch's export, checked against the schema, pseudonymised and split.

        A deployed branch reads the export its node config names (``data-path``, raw ids
        pseudonymised with ``key-path``); a simulated one the pseudonymised export in its folder.
        """
        schema = get_schema(settings.schema)
        if source.data_path is not None:
            export = branch.BranchData(source.data_path, source.key)
        else:
            export = branch.BranchData(source.folder / branch.EXPORT_FILE)
        return ChurnData(export.load(schema, seed=seed), schema)

    def statistics(self, data: ChurnData, settings: ChurnSettings) -> dict[str, MetricValue]:
        """The branch's moments of its numeric training columns (for the shared scaler)."""
        return {k.KEY_MOMENTS: branch.moments(data.split, data.schema).to_list()}

    def train(
        self, data: ChurnData, arrays: Arrays, settings: ChurnSettings, ctx: RoundContext
    ) -> LocalUpdate:
        """Local SGD/Adam epochs (with FedProx's proximal term when the server sends one)."""
        mu = ctx.config.get(k.KEY_PROXIMAL_MU, 0.0)
        out = branch.train(
            data.split,
            data.schema,
            scaler_from(ctx.config),
            _torch(arrays),
            settings.train_settings(proximal_mu=float(mu) if isinstance(mu, int | float) else 0.0),
            seed=ctx.seed,
        )
        return LocalUpdate(
            _numpy(out.state_dict), out.num_examples, {k.KEY_TRAIN_LOSS: out.train_loss}
        )

    def private_rows(self, data: ChurnData, settings: ChurnSettings) -> PrivateRows:
        """One DP-SGD row per training row; customer-level when every row is a customer."""
        customer = data.one_row_per_customer()
        return PrivateRows(
            rows=len(data.split.train),
            batch_size=settings.batch_size,
            epochs=settings.local_epochs,
            unit="customer" if customer else "record",
            note=(
                "privacy unit customer: one row per customer, so record-level DP-SGD is "
                "customer-level"
                if customer
                else "privacy unit record: customers may have several rows"
            ),
        )

    def train_private(
        self,
        data: ChurnData,
        arrays: Arrays,
        settings: ChurnSettings,
        ctx: RoundContext,
        *,
        config: DPSGDConfig,
        plan: NoisePlan,
    ) -> PrivateUpdate:
        """Record-level DP-SGD (FedProx's proximal term is not clipped: refused with DP)."""
        out = branch.train_private(
            data.split,
            data.schema,
            scaler_from(ctx.config),
            _torch(arrays),
            settings.train_settings(),
            dp=config,
            plan=plan,
        )
        return PrivateUpdate(_numpy(out.state_dict), out.num_examples, out.event)

    def evaluate(
        self, data: ChurnData, arrays: Arrays, settings: ChurnSettings, ctx: RoundContext
    ) -> dict[str, MetricValue]:
        """Loss sum, branch AUC and score histograms of the validation and test rows."""
        out = branch.evaluate(data.split, data.schema, scaler_from(ctx.config), _torch(arrays))
        return {
            k.KEY_NUM_EXAMPLES: out.num_examples,
            k.KEY_LOSS_SUM: out.loss_sum,
            k.KEY_BRANCH_AUC: out.branch_auc,
            k.KEY_HIST_VAL_POS: out.val.pos.tolist(),
            k.KEY_HIST_VAL_NEG: out.val.neg.tolist(),
            k.KEY_HIST_TEST_POS: out.test.pos.tolist(),
            k.KEY_HIST_TEST_NEG: out.test.neg.tolist(),
        }

    def dp_statement(self, settings: ChurnSettings) -> DPStatement:
        """Record-level DP-SGD; churn tables hold one row per customer."""
        return DPStatement(
            mechanism="DP-SGD (Abadi et al. 2016): Poisson-subsampled Gaussian, per-example "
            "clipping",
            relation="add/remove one row",
            unit_note="record-level DP on each branch's training rows; churn tables hold one "
            "row per customer, so the guarantee is customer-level",
            not_covered="the federated scaler's moments (training rows) and the evaluation "
            "aggregates (validation and test rows) are released without noise",
        )

    # ------------------------------------------------------------------ simulation

    def save_model(self, arrays: Arrays, folder: Path) -> Path:
        """``model.safetensors`` (float32 tensors in the model's order)."""
        path = folder / MODEL_FILE
        folder.mkdir(parents=True, exist_ok=True)
        save_file(float32(arrays), str(path))
        return path

    def load_model(self, folder: Path) -> Arrays:
        """The arrays of ``model.safetensors``, in the model's order (the file sorts them)."""
        stored = load_file(str(folder / MODEL_FILE))
        return _numpy(model_from_state(_torch(stored)).state_dict())
