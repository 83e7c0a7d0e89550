"""Privacy accounting for record-level DP-SGD: noise planning and the persistent accountant.

One accountant per branch lives for the whole federation and beyond: its history of
``(noise_multiplier, sample_rate, steps)`` events is kept as plain JSON on the branch, reloaded
and validated on start, and only ever grows. Its ε covers the whole run, never one round (the
failure of Flower's Opacus example, which builds a new privacy engine every round).

Every event is one application of the Poisson-subsampled Gaussian mechanism of DP-SGD (Abadi et
al. 2016, arXiv:1607.00133), repeated ``steps`` times. ε is computed by Opacus's RDP accountant
(Mironov 2017, "Rényi Differential Privacy", arXiv:1702.07476; subsampled Gaussian analysis of
Mironov, Talwar and Zhang 2019, arXiv:1908.10530) or by its PRV accountant (Gopi, Lee and Wutschitz
2021, "Numerical Composition of Differential Privacy", arXiv:2106.02848). This module is importable
without torch: the Opacus adapter (:mod:`fedcrm.privacy.dp_sgd`, the only module that imports
opacus) is imported on the first ε computation.
"""

import hashlib
import hmac
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, get_args

from fedcrm.exceptions import FedCrmError
from fedcrm.privacy.budget import BudgetDecision, decide
from fedcrm.privacy.config import AccountantName, DPConfig

MECHANISM: Final = "poisson-subsampled-gaussian"
"""The only mechanism DP-SGD uses, recorded with every history."""

STATE_FORMAT: Final = "fedcrm/branch-accountant"
STATE_VERSION: Final = 1
MAX_STATE_BYTES: Final = 8 * 1024 * 1024
MAX_NOISE_MULTIPLIER: Final = 1e4
MIN_NOISE_MULTIPLIER: Final = 1.0 / 64
RECOMPUTE_TOLERANCE: Final = 1e-6

_ACCOUNTANTS: Final[tuple[str, ...]] = get_args(AccountantName)
_EVENT_KEYS: Final = frozenset({"noise_multiplier", "sample_rate", "steps"})
_STATE_KEYS: Final = frozenset({"format", "version", "accountant", "mechanism", "history"})


class AccountingError(FedCrmError):
    """An accounting input is invalid or ε cannot be computed for it."""


class NoiseCalibrationError(AccountingError):
    """No noise multiplier reaches the target ε for the planned rounds."""


class AccountantStateError(AccountingError):
    """A stored accountant state is corrupted, tampered with, or does not fit this branch.

    Loading and saving never overwrite a file that raised this error.
    """


class AccountantConflict(AccountantStateError):
    """Saving would replace a stored history that is not a prefix of this one.

    That would lower, or rewrite, the branch's cumulative ε.
    """


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise AccountingError(f"delta must satisfy 0 < delta < 1, got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in _ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {_ACCOUNTANTS}, got {accountant!r}")


@dataclass(frozen=True, slots=True)
class AccountingEvent:
    """``steps`` DP-SGD steps with one noise multiplier and one Poisson sampling rate.

    Attributes:
        noise_multiplier: σ, the noise standard deviation divided by the clipping norm (> 0).
        sample_rate: q, the probability that a row is in a batch (0 < q <= 1).
        steps: Number of noisy steps taken (>= 1).

    Raises:
        AccountingError: A value is out of range.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not (
            isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0
        ):
            raise AccountingError(f"noise_multiplier must be a finite number > 0, got {sigma!r}")
        if isinstance(q, bool) or not (isinstance(q, int | float) and 0.0 < q <= 1.0):
            raise AccountingError(f"sample_rate must satisfy 0 < sample_rate <= 1, got {q!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise AccountingError(f"steps must be an integer >= 1, got {steps!r}")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))

    def as_tuple(self) -> tuple[float, float, int]:
        """Return ``(noise_multiplier, sample_rate, steps)``, Opacus's history format."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def coalesce(events: Iterable[AccountingEvent]) -> list[AccountingEvent]:
    """Merge consecutive events with the same σ and q (composition only depends on the sum)."""
    merged: list[AccountingEvent] = []
    for event in events:
        if merged and merged[-1].as_tuple()[:2] == event.as_tuple()[:2]:
            last = merged.pop()
            event = AccountingEvent(
                last.noise_multiplier, last.sample_rate, last.steps + event.steps
            )
        merged.append(event)
    return merged


def compute_epsilon(
    events: Iterable[AccountingEvent], *, delta: float, accountant: AccountantName
) -> float:
    """Return ε of the composition of ``events`` at ``delta``.

    Consecutive events with the same σ and q are merged first, so a history kept round by round
    gives exactly the ε of the plan made for all rounds at once.

    Args:
        events: The history, oldest first.
        delta: δ, 0 < δ < 1.
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        ε (0.0 for an empty history; ``inf`` when the accountant gives no finite bound).

    Raises:
        AccountingError: ``delta`` or ``accountant`` is invalid, or the accountant failed.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    merged = coalesce(events)
    if not merged:
        return 0.0
    # Imported here so that this module (and JSON state validation) works without torch.
    from fedcrm.privacy import dp_sgd

    return dp_sgd.epsilon_of_history(
        [e.as_tuple() for e in merged], delta=delta, accountant=accountant
    )


def poisson_sample_rate(*, batch_size: int, num_rows: int) -> float:
    """Return the Poisson sampling rate q = batch size / rows on the branch.

    Raises:
        AccountingError: ``batch_size`` or ``num_rows`` is not a positive integer, or the batch
            is larger than the data.
    """
    for name, value in (("batch_size", batch_size), ("num_rows", num_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AccountingError(f"{name} must be an integer >= 1, got {value!r}")
    if batch_size > num_rows:
        raise AccountingError(
            f"batch_size ({batch_size}) must not exceed the branch's rows ({num_rows})"
        )
    return batch_size / num_rows


def steps_per_epoch(sample_rate: float) -> int:
    """Return the number of Poisson-sampled batches in one epoch, ``int(1 / q)``.

    This is the number of batches Opacus's ``UniformWithReplacementSampler`` draws per epoch,
    and the number fedcrm's own Poisson loader draws.
    """
    AccountingEvent(1.0, sample_rate, 1)  # validates q
    return max(1, int(1.0 / sample_rate))


def plan_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: AccountantName = "rdp",
    rtol: float = 1e-3,
) -> float:
    """Plan σ once for the whole federation so that total ε after all rounds is <= the target.

    Bisection on σ, keeping as the answer only a σ whose ε was computed to be <= the target (so
    the plan never overshoots, whatever the tolerance). Follows Opacus's
    ``get_noise_multiplier``, but for ``rounds * steps_per_round`` steps and with the same ε
    function the branch accountant uses.

    Args:
        target_epsilon: ε after all planned rounds, > 0.
        delta: δ, 0 < δ < 1.
        sample_rate: Poisson sampling rate q, 0 < q <= 1.
        steps_per_round: DP-SGD steps per round (local epochs * :func:`steps_per_epoch`).
        rounds: Planned federated rounds.
        accountant: ``"rdp"`` (Mironov 2017) or ``"prv"`` (Gopi et al. 2021).
        rtol: Relative precision of σ.

    Returns:
        The smallest σ found (within ``rtol``) with ε <= ``target_epsilon``.

    Raises:
        AccountingError: An argument is out of range.
        NoiseCalibrationError: Even σ = 1e4 does not reach the target.

    Notes:
        σ is not searched below 1/64 (such a target ε gives essentially no protection); a
        target that large gets σ = 1/64, which still satisfies ε <= target.
    """
    if isinstance(target_epsilon, bool) or not (
        isinstance(target_epsilon, int | float)
        and math.isfinite(target_epsilon)
        and target_epsilon > 0
    ):
        raise AccountingError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    for name, value in (("steps_per_round", steps_per_round), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AccountingError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 < rtol < 1.0:
        raise AccountingError(f"rtol must satisfy 0 < rtol < 1, got {rtol!r}")
    total_steps = steps_per_round * rounds

    def epsilon(sigma: float) -> float:
        event = AccountingEvent(sigma, sample_rate, total_steps)
        return compute_epsilon([event], delta=delta, accountant=accountant)

    # Bracket: epsilon(low) > target >= epsilon(high); epsilon decreases as sigma grows.
    low, high = 0.0, 1.0
    if epsilon(high) > target_epsilon:
        while True:
            low, high = high, 2.0 * high
            if high > MAX_NOISE_MULTIPLIER:
                raise NoiseCalibrationError(
                    f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon "
                    f"{target_epsilon} at delta {delta:g} for {rounds} rounds of "
                    f"{steps_per_round} steps at sample rate {sample_rate:g}; "
                    "raise the budget or train less"
                )
            if epsilon(high) <= target_epsilon:
                break
    else:
        while epsilon(high / 2.0) <= target_epsilon:
            high /= 2.0
            if high <= MIN_NOISE_MULTIPLIER:
                return high
        low = high / 2.0
    while high - low > rtol * high:
        mid = 0.5 * (low + high)
        if epsilon(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True, slots=True)
class NoisePlan:
    """The noise of one branch for the whole federation, fixed before the first round.

    Attributes:
        noise_multiplier: σ for every round.
        sample_rate: Poisson rate q = batch size / branch rows.
        steps_per_round: ``local_epochs * int(1/q)``; pass it as ``max_steps`` to
            ``make_private`` and as ``steps`` to ``would_exceed``.
        rounds: Planned rounds.
        planned_epsilon: ε after all planned rounds (<= the target when σ was planned).
        delta: δ of ``planned_epsilon``.
        accountant: Accountant that computed it.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    planned_epsilon: float
    delta: float
    accountant: AccountantName


def plan_for_config(config: DPConfig, *, num_rows: int) -> NoisePlan:
    """Plan σ for a branch with ``num_rows`` training rows from its :class:`DPConfig`.

    With ``config.noise_multiplier`` set, that σ is kept and only its total ε is computed.

    Raises:
        AccountingError: The batch is larger than the data.
        NoiseCalibrationError: The target ε cannot be reached.
    """
    q = poisson_sample_rate(batch_size=config.batch_size, num_rows=num_rows)
    steps = config.local_epochs * steps_per_epoch(q)
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = plan_noise_multiplier(
            target_epsilon=config.target_epsilon,
            delta=config.delta,
            sample_rate=q,
            steps_per_round=steps,
            rounds=config.rounds,
            accountant=config.accountant,
        )
    planned = compute_epsilon(
        [AccountingEvent(sigma, q, steps * config.rounds)],
        delta=config.delta,
        accountant=config.accountant,
    )
    return NoisePlan(
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=steps,
        rounds=config.rounds,
        planned_epsilon=planned,
        delta=config.delta,
        accountant=config.accountant,
    )


@dataclass(frozen=True, slots=True)
class RecomputeReport:
    """ε of one history recomputed with both accountants, beside the recorded figure.

    Attributes:
        rdp_epsilon: ε by RDP.
        prv_epsilon: ε by PRV (normally the tighter of the two).
        recorded_epsilon: The figure that was stored (e.g. in the privacy ledger).
        recorded_accountant: The accountant that produced it.
        matches: Whether the recorded figure equals the recorded accountant's recomputation
            within :data:`RECOMPUTE_TOLERANCE`.
        prv_le_rdp: Whether PRV's ε <= RDP's ε.
    """

    rdp_epsilon: float
    prv_epsilon: float
    recorded_epsilon: float
    recorded_accountant: AccountantName
    matches: bool
    prv_le_rdp: bool


def recompute_check(
    events: Sequence[AccountingEvent],
    *,
    delta: float,
    recorded_epsilon: float,
    recorded_accountant: AccountantName,
    tolerance: float = RECOMPUTE_TOLERANCE,
) -> RecomputeReport:
    """Recompute ε of stored events with both accountants and compare with the stored figure.

    Raises:
        AccountingError: An argument is invalid.
    """
    _check_accountant(recorded_accountant)
    rdp = compute_epsilon(events, delta=delta, accountant="rdp")
    prv = compute_epsilon(events, delta=delta, accountant="prv")
    recomputed = rdp if recorded_accountant == "rdp" else prv
    return RecomputeReport(
        rdp_epsilon=rdp,
        prv_epsilon=prv,
        recorded_epsilon=recorded_epsilon,
        recorded_accountant=recorded_accountant,
        matches=abs(recomputed - recorded_epsilon) <= tolerance,
        prv_le_rdp=prv <= rdp,
    )


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
        _check_accountant(accountant)
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
                to :func:`fedcrm.privacy.dp_sgd.make_private` so training cannot take more).
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
        if accountant not in _ACCOUNTANTS:
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
        _check_accountant(accountant)
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
