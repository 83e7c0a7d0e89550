"""The coordinator's round checkpoint: what a restarted run needs to go on where it stopped.

After every completed round the loop writes, atomically, the global model, the best model so
far and the round records of the run into ``<dir>/<run id>/``; a run started again with the
same run id and folder resumes after the last completed round (a round offset), re-runs the
statistics query (so the ledger is reconciled with the branches first) and keeps the
statistics the model was trained with. A round that did not complete is run again: its spends
are already in the ledger or are reconciled, so no spend is counted twice or lost. See
docs/privacy-analysis.md#resuming-a-run.
"""

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord

from fedcrm.exceptions import ConfigError
from fedcrm.server.result import RoundRecord

STATE_FILE: Final = "state.json"
MODEL_FILE: Final = "model.npz"
BEST_FILE: Final = "best.npz"
_FORMAT: Final = "fedcrm/round-checkpoint/v1"


@dataclass
class Resumed:
    """A run's state after its last completed round."""

    last_round: int
    arrays: ArrayRecord
    best: ArrayRecord
    best_round: int
    best_score: float
    statistics: dict[str, Any]
    rounds: list[RoundRecord]


def _save_arrays(record: ArrayRecord, path: Path) -> None:
    arrays = {name: record[name].numpy() for name in record}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_arrays(path: Path) -> ArrayRecord:
    with np.load(path, allow_pickle=False) as data:
        return ArrayRecord({name: Array(np.ascontiguousarray(data[name])) for name in data.files})


class RoundCheckpoints:
    """Round checkpoints of the runs under one folder (one sub-folder per run id)."""

    def __init__(self, folder: Path, run_id: str) -> None:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ConfigError(f"a run id that names a checkpoint folder is needed, got {run_id!r}")
        self.folder = folder / run_id
        self.run_id = run_id

    def save(
        self,
        *,
        last_round: int,
        arrays: ArrayRecord,
        best: ArrayRecord,
        best_round: int,
        best_score: float,
        statistics: dict[str, Any],
        rounds: list[RoundRecord],
    ) -> None:
        """Write the state after ``last_round`` (models first, the state file last)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_arrays(arrays, self.folder / MODEL_FILE)
        _save_arrays(best, self.folder / BEST_FILE)
        state = {
            "format": _FORMAT,
            "run_id": self.run_id,
            "last_round": last_round,
            "best_round": best_round,
            "best_score": best_score if np.isfinite(best_score) else None,
            "statistics": statistics,
            "rounds": [asdict(r) for r in rounds],
        }
        fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".json", dir=self.folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(state, handle, default=float)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.folder / STATE_FILE)

    def load(self) -> Resumed | None:
        """The state after the last completed round, or ``None`` when the run has none.

        Raises:
            ConfigError: The checkpoint is unreadable or belongs to another run.
        """
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if state.get("format") != _FORMAT or state.get("run_id") != self.run_id:
                raise ConfigError(f"{path} is not a round checkpoint of run {self.run_id!r}")
            score = state["best_score"]
            return Resumed(
                last_round=int(state["last_round"]),
                arrays=_load_arrays(self.folder / MODEL_FILE),
                best=_load_arrays(self.folder / BEST_FILE),
                best_round=int(state["best_round"]),
                best_score=-np.inf if score is None else float(score),
                statistics=dict(state["statistics"]),
                rounds=[RoundRecord(**r) for r in state["rounds"]],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"the round checkpoint in {self.folder} is unreadable ({exc}); move the folder "
                "away to start the run afresh"
            ) from exc
