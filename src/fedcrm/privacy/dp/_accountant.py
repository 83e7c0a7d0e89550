"""The branch's persistent DP-SGD accountant: one per (model, purpose), for the whole federation.

Its history of ``(noise_multiplier, sample_rate, steps)`` events lives as JSON on the branch,
with a SHA-256 or HMAC-SHA-256 integrity field, written atomically, reloaded and validated on
start, and only ever grows; ε is computed by :func:`fedcrm.privacy.dp.compute_epsilon`. See
docs/privacy-analysis.md#the-branch-accountant.
"""

import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from fedcrm.privacy.dp._analysis import (
    MECHANISM,
    AccountingEvent,
    RecomputeReport,
    check_accountant,
    compute_epsilon,
    recompute_check,
)
from fedcrm.privacy.dp._budget import BudgetDecision, decide
from fedcrm.privacy.dp._config import ACCOUNTANTS, AccountantName
from fedcrm.privacy.dp._errors import AccountantConflict, AccountantStateError, AccountingError

STATE_FORMAT: Final = "fedcrm/branch-accountant"
STATE_VERSION: Final = 1
MAX_STATE_BYTES: Final = 8 * 1024 * 1024

_EVENT_KEYS: Final = frozenset({"noise_multiplier", "sample_rate", "steps"})
_STATE_KEYS: Final = frozenset({"format", "version", "accountant", "mechanism", "history"})


class BranchAccountant:
    """The branch's one privacy accountant for the whole federation run, persisted as JSON.

    Args:
        accountant: ``"rdp"`` (default) or ``"prv"``.
        history: Events already spent, oldest first.

    Raises:
        AccountingError: ``accountant`` is unknown or an event is invalid.

    Notes:
        The history only grows (:meth:`record`), and every event has ``steps >= 1`` and
        ``sigma > 0``, so cumulative ε can only increase. :meth:`save` refuses to replace a
        stored history that is not a prefix of this one, so a stale copy cannot lower ε on disk.
        Integrity: the file carries a SHA-256 digest of its content (detects corruption and
        careless edits) or, when a branch key is given, an HMAC-SHA-256 (detects tampering by
        anyone without the key). Neither detects a roll-back to an older genuine file; the
        privacy ledger and the audit log, kept off the branch, are the anchor for that.
    """

    def __init__(
        self, *, accountant: AccountantName = "rdp", history: Iterable[AccountingEvent] = ()
    ) -> None:
        check_accountant(accountant)
        self._accountant: AccountantName = accountant
        self._history: list[AccountingEvent] = []
        for event in history:
            if not isinstance(event, AccountingEvent):
                raise AccountingError(f"history entries must be AccountingEvent, got {event!r}")
            self._history.append(event)
        self._cache: dict[tuple[int, float], float] = {}

    @property
    def accountant(self) -> AccountantName:
        """Name of the accountant that computes ε."""
        return self._accountant

    @property
    def mechanism(self) -> str:
        """The mechanism every event applies."""
        return MECHANISM

    @property
    def history(self) -> tuple[AccountingEvent, ...]:
        """Events spent so far, oldest first (read-only)."""
        return tuple(self._history)

    @property
    def total_steps(self) -> int:
        """Noisy steps taken over the whole history."""
        return sum(e.steps for e in self._history)

    def __repr__(self) -> str:
        return (
            f"BranchAccountant(accountant={self._accountant!r}, events={len(self._history)}, "
            f"steps={self.total_steps})"
        )

    def epsilon(self, delta: float) -> float:
        """Return the cumulative ε spent at ``delta``."""
        key = (len(self._history), float(delta))
        if key not in self._cache:
            self._cache[key] = compute_epsilon(
                self._history, delta=delta, accountant=self._accountant
            )
        return self._cache[key]

    def projected_epsilon(self, event: AccountingEvent, *, delta: float) -> float:
        """Return the cumulative ε after ``event``, without recording it."""
        return compute_epsilon([*self._history, event], delta=delta, accountant=self._accountant)

    def would_exceed(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        budget: float,
    ) -> BudgetDecision:
        """Decide whether a proposed round fits in the budget; nothing is recorded.

        Args:
            noise_multiplier: σ of the proposed round.
            sample_rate: q of the proposed round.
            steps: The most steps the round may take (pass the same number as ``max_steps``
                to :func:`fedcrm.privacy.dp.make_private` so training cannot take more).
            delta: δ of the budget.
            budget: Maximum cumulative ε.

        Returns:
            The decision, with current and projected ε and a reason.

        Raises:
            AccountingError: An argument is out of range.
        """
        event = AccountingEvent(noise_multiplier, sample_rate, steps)
        return decide(
            current_epsilon=self.epsilon(delta),
            projected_epsilon=self.projected_epsilon(event, delta=delta),
            budget=budget,
            delta=delta,
            accountant=self._accountant,
        )

    def record(self, event: AccountingEvent) -> None:
        """Append the steps a round actually took; cumulative ε can only grow.

        Raises:
            AccountingError: ``event`` is not an :class:`AccountingEvent`.
        """
        if not isinstance(event, AccountingEvent):
            raise AccountingError(f"expected an AccountingEvent, got {event!r}")
        self._history.append(event)
        self._cache.clear()

    def recompute_check(self, *, delta: float, recorded_epsilon: float) -> RecomputeReport:
        """Recompute this history's ε with both accountants against a recorded figure."""
        return recompute_check(
            self._history,
            delta=delta,
            recorded_epsilon=recorded_epsilon,
            recorded_accountant=self._accountant,
        )

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """Return the state as plain JSON-compatible data (no integrity field)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "accountant": self._accountant,
            "mechanism": MECHANISM,
            "history": [
                {
                    "noise_multiplier": e.noise_multiplier,
                    "sample_rate": e.sample_rate,
                    "steps": e.steps,
                }
                for e in self._history
            ],
        }

    @classmethod
    def from_state_dict(cls, state: object) -> "BranchAccountant":
        """Validate plain data made by :meth:`state_dict` and rebuild the accountant.

        Raises:
            AccountantStateError: The data does not describe a valid accountant state.
        """
        if not isinstance(state, dict):
            raise AccountantStateError("accountant state must be a JSON object")
        if set(state) != _STATE_KEYS:
            raise AccountantStateError(
                f"accountant state keys must be {sorted(_STATE_KEYS)}, got {sorted(state)}"
            )
        if state["format"] != STATE_FORMAT or state["version"] != STATE_VERSION:
            raise AccountantStateError(
                f"unsupported accountant state format {state['format']!r} version "
                f"{state['version']!r} (expected {STATE_FORMAT!r} version {STATE_VERSION})"
            )
        accountant = state["accountant"]
        if accountant not in ACCOUNTANTS:
            raise AccountantStateError(f"unknown accountant {accountant!r}")
        if state["mechanism"] != MECHANISM:
            raise AccountantStateError(
                f"unknown mechanism {state['mechanism']!r} (expected {MECHANISM!r})"
            )
        raw_history = state["history"]
        if not isinstance(raw_history, list):
            raise AccountantStateError("history must be a list")
        events: list[AccountingEvent] = []
        for index, item in enumerate(raw_history):
            if not isinstance(item, dict) or set(item) != _EVENT_KEYS:
                raise AccountantStateError(
                    f"history[{index}] must be an object with keys {sorted(_EVENT_KEYS)}"
                )
            try:
                events.append(
                    AccountingEvent(item["noise_multiplier"], item["sample_rate"], item["steps"])
                )
            except AccountingError as exc:
                raise AccountantStateError(f"history[{index}]: {exc}") from exc
        return cls(accountant=accountant, history=events)

    def to_json(self, *, key: bytes | None = None) -> str:
        """Serialise the state with an integrity field (SHA-256, or HMAC-SHA-256 with ``key``)."""
        body = self.state_dict()
        algorithm, digest = _digest(_canonical(body), key)
        return json.dumps(
            {**body, "integrity": {"algorithm": algorithm, "digest": digest}},
            indent=2,
            sort_keys=True,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes, *, key: bytes | None = None) -> "BranchAccountant":
        """Parse, check the integrity of, and validate a state made by :meth:`to_json`.

        Args:
            text: The serialised state.
            key: The branch key, required when (and only when) the state carries an HMAC.

        Raises:
            AccountantStateError: The text is not valid JSON, fails its integrity check, or does
                not describe a valid accountant state.
        """
        try:
            data = json.loads(
                text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicates
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise AccountantStateError(f"accountant state is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or "integrity" not in data:
            raise AccountantStateError("accountant state has no integrity field")
        integrity = data.pop("integrity")
        if (
            not isinstance(integrity, dict)
            or set(integrity) != {"algorithm", "digest"}
            or not all(isinstance(v, str) for v in integrity.values())
        ):
            raise AccountantStateError("integrity field must be {'algorithm': str, 'digest': str}")
        expected_algorithm, expected = _digest(_canonical(data), key)
        if integrity["algorithm"] != expected_algorithm:
            hint = (
                "pass the branch key"
                if integrity["algorithm"] == "hmac-sha256"
                else "the file carries no HMAC although a branch key was given"
            )
            raise AccountantStateError(
                f"integrity algorithm is {integrity['algorithm']!r}, expected "
                f"{expected_algorithm!r}: {hint}"
            )
        if not hmac.compare_digest(integrity["digest"], expected):
            raise AccountantStateError(
                "accountant state failed its integrity check (corrupted or modified); "
                "restore it from a backup or the privacy ledger - never reset it"
            )
        return cls.from_state_dict(data)

    def save(self, path: str | os.PathLike[str], *, key: bytes | None = None) -> None:
        """Write the state atomically (temporary file, fsync, rename).

        Args:
            path: Destination file.
            key: Branch key for an HMAC; use the same key to :meth:`load`.

        Raises:
            AccountantStateError: The existing file is unreadable, corrupted or from another
                accountant (it is left as it is).
            AccountantConflict: The existing file's history is not a prefix of this one.
        """
        target = Path(path)
        if target.exists():
            stored = type(self).load(target, key=key)
            if stored.accountant != self._accountant:
                raise AccountantStateError(
                    f"{target} holds a {stored.accountant} accountant, not {self._accountant}"
                )
            if list(stored.history) != self._history[: len(stored.history)]:
                raise AccountantConflict(
                    f"{target} holds a history ({len(stored.history)} events, "
                    f"{stored.total_steps} steps) that is not a prefix of this one "
                    f"({len(self._history)} events, {self.total_steps} steps); refusing to "
                    "overwrite it, which could lower the branch's cumulative epsilon"
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = self.to_json(key=key).encode("utf-8")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key: bytes | None = None) -> "BranchAccountant":
        """Read and validate a state written by :meth:`save`.

        Raises:
            AccountantStateError: The file is missing, too large, corrupted or tampered with.
        """
        source = Path(path)
        try:
            size = source.stat().st_size
            if size > MAX_STATE_BYTES:
                raise AccountantStateError(
                    f"{source} is {size} bytes, larger than any accountant state "
                    f"({MAX_STATE_BYTES} bytes)"
                )
            raw = source.read_bytes()
        except OSError as exc:
            raise AccountantStateError(f"cannot read accountant state {source}: {exc}") from exc
        try:
            return cls.from_json(raw, key=key)
        except AccountantStateError as exc:
            raise AccountantStateError(f"{source}: {exc}") from exc

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        accountant: AccountantName = "rdp",
        key: bytes | None = None,
    ) -> "BranchAccountant":
        """Load the branch's accountant if its file exists, else start an empty one (unsaved).

        Raises:
            AccountantStateError: The file is invalid, or holds a different accountant than
                ``accountant`` (switching accountants mid-run is refused).
        """
        check_accountant(accountant)
        if not Path(path).exists():
            return cls(accountant=accountant)
        loaded = cls.load(path, key=key)
        if loaded.accountant != accountant:
            raise AccountantStateError(
                f"{path} holds a {loaded.accountant} accountant but {accountant} was asked for; "
                "keep the accountant of the run (recompute with the other one via "
                "recompute_check)"
            )
        return loaded


def _canonical(body: object) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _digest(payload: bytes, key: bytes | None) -> tuple[str, str]:
    if key is None:
        return "sha256", hashlib.sha256(payload).hexdigest()
    if not isinstance(key, bytes) or len(key) < 16:
        raise AccountantStateError("the branch key must be at least 16 bytes")
    return "hmac-sha256", hmac.new(key, payload, hashlib.sha256).hexdigest()


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate key {name!r}")
        result[name] = value
    return result


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
