"""The nudge domain's storage seam: decisions, nudges and their delivery, feedback, push targets
and outcomes. JSON-valued columns travel as already-encoded strings: the engine owns their shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol


class Row(Protocol):
    """A result row of either backend (a tuple, sqlite3.Row, asyncpg.Record), by position."""

    def __getitem__(self, index: int, /) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...


@dataclass(frozen=True, slots=True)
class NudgeRow:
    """A nudge as stored (data and reasons JSON-encoded)."""

    nudge_id: str
    nudge_type: str
    title: str
    message: str
    data_json: str
    probability: float
    reasons_json: str
    create_us: int
    expire_us: int

    @classmethod
    def from_row(cls, r: Row) -> NudgeRow:
        """A nudge from a result row whose first columns are NUDGE_COLUMNS."""
        return cls(
            str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
            float(r[5]), str(r[6]), int(r[7]), int(r[8]),
        )  # fmt: skip


# The columns NudgeRow.from_row reads, in order, of the nudges table aliased `n`.
NUDGE_COLUMNS: Final = (
    "n.nudge_id, n.nudge_type, n.title, n.message, n.data, n.probability, n.reasons,"
    " n.create_us, n.expire_us"
)


@dataclass(frozen=True, slots=True)
class NudgeHistoryRow:
    """A nudge with its delivery, outcome and the device it was routed to (ListNudges)."""

    nudge: NudgeRow
    deliver_us: int | None
    outcome_metric: str
    outcome_value: float | None
    outcome_complete: bool
    device_id: str | None
    feedback: tuple[int, ...]

    @classmethod
    def from_row(cls, r: Row, feedback: tuple[int, ...]) -> NudgeHistoryRow:
        """From NUDGE_COLUMNS followed by deliver_us, outcome_metric, outcome_value,
        outcome_complete and the routed device's id."""
        return cls(
            NudgeRow.from_row(r),
            None if r[9] is None else int(r[9]),
            str(r[10]),
            None if r[11] is None else float(r[11]),
            bool(r[12]),
            None if r[13] is None else str(r[13]),
            feedback,
        )


@dataclass(frozen=True, slots=True)
class PushTargetRow:
    device_pk: int
    user_id: int
    device_id: str
    kind: int
    push_token: str
    update_us: int


@dataclass(frozen=True, slots=True)
class DecisionRow:
    """One decision point as logged (features, options, ineligible, predicted JSON-encoded)."""

    user_id: int
    decision_us: int
    trigger: str
    policy_version: str
    features_json: str
    options_json: str
    ineligible_json: str
    chosen: str
    probability: float
    predicted_json: str


@dataclass(frozen=True, slots=True)
class NewNudge:
    row: NudgeRow
    device_pk: int
    outcome_metric: str


@dataclass(frozen=True, slots=True)
class OpenDecision:
    """A decision whose outcome is still to be computed."""

    decision_id: int
    user_id: int
    decision_us: int
    chosen: str
    nudge_id: str | None
    features_json: str


@dataclass(frozen=True, slots=True)
class TrainingRow:
    """A decision with its complete outcome, as training reads it (features JSON-encoded)."""

    user_id: int  # negative for people of an imported log
    decision_us: int
    features_json: str
    options_json: str
    chosen: str
    probability: float
    outcome_steps: float
    acted: bool

    @classmethod
    def from_row(cls, r: Row) -> TrainingRow:
        """From (user_id, decision_us, features, options, chosen, probability, outcome, acted)."""
        u, at, f, o, c, p, out, a = r
        return cls(int(u), int(at), str(f), str(o), str(c), float(p), float(out), bool(a))


@dataclass(frozen=True, slots=True)
class ImportedDecision:
    """A decision of a log imported from another deployment or a trial."""

    person: str
    decision_us: int
    features_json: str
    options_json: str
    chosen: str
    probability: float
    outcome_steps: float


@dataclass(frozen=True, slots=True)
class LoggedOutcome:
    """A decision with its policy and outcome, as a simulation reads the log back."""

    user_id: int
    decision_us: int
    policy_version: str
    options_json: str
    chosen: str
    probability: float
    outcome_steps: float | None
    outcome_complete: bool

    @classmethod
    def from_row(cls, r: Row) -> LoggedOutcome:
        """From (user_id, decision_us, policy_version, options, chosen, probability,
        outcome_steps, outcome_complete)."""
        u, at, v, o, c, p, out, done = r
        return cls(
            int(u), int(at), str(v), str(o), str(c), float(p),
            None if out is None else float(out), bool(done),
        )  # fmt: skip


class NudgeStorage(Protocol):
    async def log_decision(self, decision: DecisionRow, nudge: NewNudge | None) -> int:
        """Store the decision (and the nudge it made, pending) in one transaction; its id."""
        ...

    async def recent(self, user_id: int, since_us: int) -> list[tuple[str, int]]:
        """(nudge type, create time) of the user's nudges created after since_us, oldest first."""
        ...

    async def pending(self, user_id: int, device_pk: int, now_us: int) -> list[NudgeRow]:
        """Undelivered, unexpired nudges routed to the device, oldest first."""
        ...

    async def mark_delivered(
        self, nudge_id: str, device_pk: int, channel: str, now_us: int
    ) -> bool:
        """Mark a pending nudge delivered; False when it was not pending any more."""
        ...

    async def route(self, nudge_id: str, device_pk: int) -> None:
        """Route the nudge to another device."""
        ...

    async def expire(self, now_us: int) -> int:
        """Mark pending nudges expired at now_us; how many."""
        ...

    async def push_targets(self) -> list[PushTargetRow]:
        """Push targets of devices not revoked."""
        ...

    async def push_target(self, device_pk: int) -> PushTargetRow | None:
        """The device's push target; None without one (removed) or for a revoked device."""
        ...

    async def set_push_target(
        self, user_id: int, device_pk: int, push_token: str, now_us: int
    ) -> None:
        """Set the device's push token, or remove it when push_token is empty."""
        ...

    async def owns(self, user_id: int, nudge_id: str) -> bool:
        """Whether the nudge exists and is the user's."""
        ...

    async def add_feedback(
        self,
        user_id: int,
        nudge_id: str,
        device_pk: int,
        action: int,
        action_us: int,
        received_us: int,
    ) -> bool:
        """Record one action on one of the user's nudges; False if the nudge is not the user's
        or the (nudge, action) was recorded already."""
        ...

    async def acted(self, nudge_id: str, action: int) -> bool:
        """Whether feedback with this action exists for the nudge."""
        ...

    async def open_decisions(self, decided_before_us: int) -> list[OpenDecision]:
        """Decisions at or before the time whose outcome is not complete, oldest first."""
        ...

    async def complete_outcomes(
        self, decisions: list[tuple[int, float]], nudges: list[tuple[str, float | None]]
    ) -> None:
        """Store outcomes ((decision id, steps), (nudge id, value)) and mark them complete."""
        ...

    async def history_page(
        self,
        user_id: int,
        start_us: int,
        end_us: int,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[NudgeHistoryRow]:
        """The user's nudges created in [start, end), newest first, keyset-paged after
        (create_us, nudge_id), with each one's feedback actions in order."""
        ...

    async def training_rows(
        self, since_us: int, acted_action: int, consent_category: int
    ) -> list[TrainingRow]:
        """Complete decisions since since_us of people whose latest choice grants
        consent_category, and every imported decision since then, ordered by time."""
        ...

    async def replace_imported(self, source: str, rows: list[ImportedDecision]) -> int:
        """Replace the decisions imported from source by rows, in one transaction; how many."""
        ...

    async def outcome_log(self) -> list[LoggedOutcome]:
        """Every decision with its outcome, by decision time."""
        ...
