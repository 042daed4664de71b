"""A run's states and the one table of moves between them; nothing else states the state machine.

    (new) ──submit──▶ queued ──claim──▶ running ──succeed | diverge | prune | fail──▶ final
                        ▲                  │
                        └── preempt | crash | lose (attempts left, or free) ┘
    queued | running ──cancel──▶ cancelled          failed | diverged | cancelled | pruned ──retry──▶ queued
    (new) ──import──▶ succeeded  (a result measured elsewhere)

A final run is never modified except by an explicit retry, the contract of Optuna's storages
(`check_trial_is_updatable`); procrastinate's `finish_job` likewise refuses a job that is not in the state
it should leave. Every write of a run's state (queue.py; submission.py when it creates runs) asks this table
for the move: the SQL condition is the event's source states (`sources`), the new state its target
(`target`); a request the table does not allow is refused with `IllegalMove`, which says what would be allowed.

Whether a crash is retried or fails the run (attempts left?), and whether a preemption costs an attempt, are
queue.py's accounting; which event an ending is, is `ending_event`'s.
"""

from __future__ import annotations

from enum import Enum

from trainer.rundir import Status


class RunState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"
    PRUNED = "pruned"

    def __str__(self) -> str:  # f-strings and SQL parameters read "queued", not "RunState.QUEUED"
        return self.value


class Event(str, Enum):
    SUBMIT = "submit"  # a new run is queued
    IMPORT = "import"  # a result measured elsewhere is stored as a finished run
    CLAIM = "claim"  # a worker takes a queued run
    PREEMPT = "preempt"  # the trainer checkpointed and stopped (STOP, SIGTERM, full disk): free, resumes later
    CRASH = "crash"  # the launch ended without a result and attempts are left: retried
    LOSE = "lose"  # the worker stopped heartbeating; its launch is judged by the next claimer
    SUCCEED = "succeed"
    DIVERGE = "diverge"
    PRUNE = "prune"
    FAIL = "fail"  # no retry can fix it, or the attempts are used up
    CANCEL = "cancel"
    RETRY = "retry"

    def __str__(self) -> str:
        return self.value


Q, R = RunState.QUEUED, RunState.RUNNING
NEW = None  # the "state" of a run not stored yet

# (state, event) -> state. The only statement of the state machine: everything else derives from it.
MOVES: dict[tuple[RunState | None, Event], RunState] = {
    (NEW, Event.SUBMIT): Q,
    (NEW, Event.IMPORT): RunState.SUCCEEDED,
    (Q, Event.CLAIM): R,
    (R, Event.PREEMPT): Q,
    (R, Event.CRASH): Q,
    (R, Event.LOSE): Q,
    (R, Event.SUCCEED): RunState.SUCCEEDED,
    (R, Event.DIVERGE): RunState.DIVERGED,
    (R, Event.PRUNE): RunState.PRUNED,
    (R, Event.FAIL): RunState.FAILED,
    (Q, Event.CANCEL): RunState.CANCELLED,
    (R, Event.CANCEL): RunState.CANCELLED,
    **{(s, Event.RETRY): Q for s in (RunState.FAILED, RunState.DIVERGED, RunState.CANCELLED, RunState.PRUNED)},
}

ACTIVE = frozenset({Q, R})
FINAL = frozenset(RunState) - ACTIVE


class IllegalMove(ValueError):
    """A state change the table does not allow (a finished run cannot be cancelled, a running one retried)."""

    def __init__(self, state: RunState | None, event: Event, run_id: str | None = None):
        self.state, self.event, self.run_id = state, event, run_id
        allowed = ", ".join(sorted(str(s) for s in sources(event) if s is not None)) or "not yet stored"
        which = f"run {run_id}" if run_id else "a run"
        now = f"is {state}" if state is not None else "does not exist"
        super().__init__(f"{which} {now}: only a run that is {allowed} can be {_PAST[event]}")


_PAST = {
    Event.SUBMIT: "submitted",
    Event.IMPORT: "imported",
    Event.CLAIM: "claimed",
    Event.PREEMPT: "preempted",
    Event.CRASH: "requeued after a crash",
    Event.LOSE: "requeued for a lost worker",
    Event.SUCCEED: "succeeded",
    Event.DIVERGE: "marked diverged",
    Event.PRUNE: "pruned",
    Event.FAIL: "failed",
    Event.CANCEL: "cancelled",
    Event.RETRY: "retried (`orch retry`)",
}


def move(state: RunState | str | None, event: Event, run_id: str | None = None) -> RunState:
    """The state `event` takes a run in `state` to; IllegalMove if the table has no such move."""
    key = (RunState(state) if state is not None else None, event)
    if key not in MOVES:
        raise IllegalMove(key[0], event, run_id)
    return MOVES[key]


def sources(event: Event) -> frozenset[RunState | None]:
    """The states `event` may leave: the condition of its UPDATE."""
    return frozenset(s for s, e in MOVES if e == event)


def target(event: Event) -> RunState:
    """The state `event` enters (one per event, whichever state it leaves)."""
    (out,) = {t for (_, e), t in MOVES.items() if e == event}
    return out


def stored_sources(event: Event) -> list[str]:
    """`sources` as the strings stored in the runs table."""
    return sorted(str(s) for s in sources(event) if s is not None)


# A trainer's ending (result.json "status") as the event it is for the run. `failed` from the trainer itself
# is an error no retry can fix (bad config, missing data): FAIL, not CRASH.
_ENDINGS = {
    Status.SUCCEEDED: Event.SUCCEED,
    Status.DIVERGED: Event.DIVERGE,
    Status.PRUNED: Event.PRUNE,
    Status.PREEMPTED: Event.PREEMPT,
    Status.FAILED: Event.FAIL,
}


def ending_event(status: Status | str) -> Event:
    return _ENDINGS[Status(status)]


# Every event has one target state (target() relies on it); checked once at import so an edit to MOVES that
# breaks it fails at once, not at the first such move.
for _event in Event:
    target(_event)
