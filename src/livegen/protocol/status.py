"""Job states, the transitions between them, and their wire form.

fal's clients know exactly three status strings: ``IN_QUEUE``, ``IN_PROGRESS`` and
``COMPLETED``; failed and cancelled jobs are ``COMPLETED`` with ``error`` set. Any other string
breaks them (Python raises, JS polls forever), so ``wire_status`` is the only place that maps.
"""

from __future__ import annotations

import enum

from livegen.protocol.errors import InvalidTransition


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})

# RUNNING -> QUEUED: recovery after a crash re-runs the job.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELED: frozenset(),
}


def check_transition(old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"a job cannot go from {old.value} to {new.value}")


def wire_status(state: JobState) -> str:
    match state:
        case JobState.QUEUED:
            return "IN_QUEUE"
        case JobState.RUNNING:
            return "IN_PROGRESS"
        case _:
            return "COMPLETED"
