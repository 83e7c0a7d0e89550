"""The branch's persistent DP-SGD accountant: one per (model, purpose), across every run.

Its history of spends (``(noise_multiplier, sample_rate, steps)`` with the run, round and id of
each) lives as JSON on the branch, with a SHA-256 or HMAC-SHA-256 integrity field, written
atomically, reloaded and validated on start, and only ever grows. A round's spend is reserved
(written) before the branch trains and released after, so a crash never loses one; ε is
computed by :func:`fedcrm.privacy.dp.compute_epsilon`. See
docs/privacy-analysis.md#the-branch-accountant.
"""

import hashlib
import hmac
import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal, get_args

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
STATE_VERSION: Final = 2
"""Version 2 tags every event with its spend (id, run, round, status); version 1 files load."""
MAX_STATE_BYTES: Final = 8 * 1024 * 1024

SpendStatus = Literal["reserved", "released"]
"""``reserved``: written before training (the data may have been used, no update left yet);
``released``: the update was handed to the network. Both count in ε."""
SPEND_STATUSES: Final[tuple[str, ...]] = get_args(SpendStatus)

_EVENT_KEYS: Final = frozenset({"noise_multiplier", "sample_rate", "steps"})
_SPEND_KEYS: Final = _EVENT_KEYS | {"spend_id", "run_id", "round", "status"}
_STATE_KEYS: Final = frozenset({"format", "version", "accountant", "mechanism", "history"})


@dataclass(frozen=True, slots=True)
class Spend:
    """One charge to the branch's budget: an event and the round that made it.

    Attributes:
        event: What was spent (σ, q, steps).
        spend_id: Unique id (the ledger row of this spend carries it); ``None`` for spends
            of version-1 files, which had no ids.
        run_id: The run that spent it (``None``: unknown, version 1).
        round: The server round (``None``: unknown, version 1).
        status: ``reserved`` or ``released`` (:data:`SpendStatus`).
    """

    event: AccountingEvent
    spend_id: str | None = None
    run_id: str | None = None
    round: int | None = None
    status: SpendStatus = "released"

    def to_json(self) -> dict[str, object]:
        """Plain JSON data (the event's fields and the tags)."""
        return {
            "noise_multiplier": self.event.noise_multiplier,
            "sample_rate": self.event.sample_rate,
            "steps": self.event.steps,
            "spend_id": self.spend_id,
            "run_id": self.run_id,
            "round": self.round,
            "status": self.status,
        }

    @classmethod
    def from_json(cls, item: object, *, where: str) -> "Spend":
        """Validate one history item (version 1: the event only; version 2: with tags).

        Raises:
            AccountantStateError: The item is malformed.
        """
        if not isinstance(item, dict) or set(item) not in (_EVENT_KEYS, _SPEND_KEYS):
            raise AccountantStateError(
                f"{where} must be an object with keys {sorted(_SPEND_KEYS)} "
                f"(or {sorted(_EVENT_KEYS)} in version 1)"
            )
        try:
            event = AccountingEvent(item["noise_multiplier"], item["sample_rate"], item["steps"])
        except AccountingError as exc:
            raise AccountantStateError(f"{where}: {exc}") from exc
        if set(item) == _EVENT_KEYS:
            return cls(event)
        spend_id, run_id, rnd, status = (item[k] for k in ("spend_id", "run_id", "round", "status"))
        if not (spend_id is None or (isinstance(spend_id, str) and 0 < len(spend_id) <= 64)):
            raise AccountantStateError(f"{where}: spend_id must be a short string or null")
        if not (run_id is None or isinstance(run_id, str)):
            raise AccountantStateError(f"{where}: run_id must be a string or null")
        if not (rnd is None or (isinstance(rnd, int) and not isinstance(rnd, bool) and rnd >= 0)):
            raise AccountantStateError(f"{where}: round must be an integer >= 0 or null")
        if status not in SPEND_STATUSES:
            raise AccountantStateError(f"{where}: status must be one of {SPEND_STATUSES}")
        return cls(event, spend_id, run_id, rnd, status)


def parse_spends(text: str) -> list[Spend]:
    """Tagged spends as JSON (a branch's privacy state, a train message's ledger spends).

    Raises:
        AccountantStateError: The JSON is not a list of spends that all have ids.
    """
    try:
        items = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise AccountantStateError(f"spends are not valid JSON: {exc}") from exc
    if not isinstance(items, list):
        raise AccountantStateError("spends must be a JSON list")
    spends = [Spend.from_json(item, where=f"spends[{i}]") for i, item in enumerate(items)]
    if any(s.spend_id is None for s in spends):
        raise AccountantStateError("every spend sent between branch and ledger needs an id")
    return spends


class BranchAccountant:
    """The branch's one privacy accountant for the whole federation run, persisted as JSON.

    Args:
        accountant: ``"rdp"`` (default) or ``"prv"``.
        history: Events already spent, oldest first (as untagged spends).
        spends: Spends already made, oldest first (after ``history``).

    Raises:
        AccountingError: ``accountant`` is unknown or an event is invalid.

    Notes:
        The history only grows (:meth:`reserve`, :meth:`record`, :meth:`absorb`), and every
        event has ``steps >= 1`` and ``sigma > 0``, so cumulative ε can only increase; a spend's
        status only moves from reserved to released. :meth:`save` refuses to replace a stored
        history that is not a prefix of this one, so a stale copy cannot lower ε on disk.
        Integrity: the file carries a SHA-256 digest of its content (detects corruption and
        careless edits) or, when a branch key is given, an HMAC-SHA-256 (detects tampering by
        anyone without the key). Neither detects a roll-back to an older genuine file; the
        privacy ledger and the audit log, kept off the branch, are the anchor for that.
    """

    def __init__(
        self,
        *,
        accountant: AccountantName = "rdp",
        history: Iterable[AccountingEvent] = (),
        spends: Iterable[Spend] = (),
    ) -> None:
        check_accountant(accountant)
        self._accountant: AccountantName = accountant
        self._spends: list[Spend] = []
        for event in history:
            if not isinstance(event, AccountingEvent):
                raise AccountingError(f"history entries must be AccountingEvent, got {event!r}")
            self._spends.append(Spend(event))
        for spend in spends:
            if not isinstance(spend, Spend):
                raise AccountingError(f"spends must be Spend, got {spend!r}")
            self._spends.append(spend)
        ids = [s.spend_id for s in self._spends if s.spend_id is not None]
        if len(set(ids)) != len(ids):
            raise AccountingError("spend ids must be unique")
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
        return tuple(s.event for s in self._spends)

    @property
    def spends(self) -> tuple[Spend, ...]:
        """Spends so far with their ids, runs, rounds and status, oldest first (read-only)."""
        return tuple(self._spends)

    @property
    def total_steps(self) -> int:
        """Noisy steps taken over the whole history."""
        return sum(s.event.steps for s in self._spends)

    def __repr__(self) -> str:
        return (
            f"BranchAccountant(accountant={self._accountant!r}, events={len(self._spends)}, "
            f"steps={self.total_steps})"
        )

    def epsilon(self, delta: float) -> float:
        """Return the cumulative ε spent at ``delta``."""
        key = (len(self._spends), float(delta))
        if key not in self._cache:
            self._cache[key] = compute_epsilon(
                self.history, delta=delta, accountant=self._accountant
            )
        return self._cache[key]

    def projected_epsilon(self, event: AccountingEvent, *, delta: float) -> float:
        """Return the cumulative ε after ``event``, without recording it."""
        return compute_epsilon([*self.history, event], delta=delta, accountant=self._accountant)

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
        self._append(Spend(event))

    def reserve(self, event: AccountingEvent, *, run_id: str, server_round: int) -> Spend:
        """Charge a round's planned spend before it trains (write-ahead); save it at once.

        The reservation counts in ε from now on, whether or not the round finishes: the
        branch may have touched its data. Returns the spend (its id goes with the update).

        Raises:
            AccountingError: ``event`` is not an :class:`AccountingEvent`.
        """
        if not isinstance(event, AccountingEvent):
            raise AccountingError(f"expected an AccountingEvent, got {event!r}")
        spend = Spend(event, uuid.uuid4().hex, run_id, server_round, "reserved")
        self._append(spend)
        return spend

    def release(self, spend_id: str) -> Spend:
        """Mark a reserved spend released (its update is leaving the branch); ε is unchanged.

        Raises:
            AccountingError: No spend has this id.
        """
        for index, spend in enumerate(self._spends):
            if spend.spend_id == spend_id:
                self._spends[index] = replace(spend, status="released")
                return self._spends[index]
        raise AccountingError(f"no spend with id {spend_id!r}")

    def absorb(self, spends: Iterable[Spend]) -> list[Spend]:
        """Add spends known elsewhere (the ledger) whose ids this accountant lacks; ε grows.

        Returns:
            The spends added.
        """
        known = {s.spend_id for s in self._spends}
        added = [s for s in spends if s.spend_id is not None and s.spend_id not in known]
        for spend in added:
            self._append(spend)
        return added

    def _append(self, spend: Spend) -> None:
        self._spends.append(spend)
        self._cache.clear()

    def recompute_check(self, *, delta: float, recorded_epsilon: float) -> RecomputeReport:
        """Recompute this history's ε with both accountants against a recorded figure."""
        return recompute_check(
            self.history,
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
            "history": [spend.to_json() for spend in self._spends],
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
        if state["format"] != STATE_FORMAT or state["version"] not in (1, STATE_VERSION):
            raise AccountantStateError(
                f"unsupported accountant state format {state['format']!r} version "
                f"{state['version']!r} (expected {STATE_FORMAT!r} version 1 or {STATE_VERSION})"
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
        spends = [
            Spend.from_json(item, where=f"history[{index}]")
            for index, item in enumerate(raw_history)
        ]
        try:
            return cls(accountant=accountant, spends=spends)
        except AccountingError as exc:
            raise AccountantStateError(str(exc)) from exc

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
            if not _is_prefix(stored.spends, self._spends):
                raise AccountantConflict(
                    f"{target} holds a history ({len(stored.spends)} events, "
                    f"{stored.total_steps} steps) that is not a prefix of this one "
                    f"({len(self._spends)} events, {self.total_steps} steps); refusing to "
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


def _is_prefix(stored: Iterable[Spend], spends: list[Spend]) -> bool:
    """Whether ``stored`` is a prefix of ``spends`` (a status may only go to released)."""
    before = list(stored)
    if len(before) > len(spends):
        return False
    return all(
        replace(old, status="released") == replace(new, status="released")
        and (old.status == new.status or new.status == "released")
        for old, new in zip(before, spends, strict=False)
    )


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
