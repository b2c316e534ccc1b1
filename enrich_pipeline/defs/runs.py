"""What the sensors share: which runs count as in flight, and a failed tick as one reason."""

from dagster import DagsterRunStatus, SkipReason

IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def retry_later(what: str, exc: BaseException) -> SkipReason:
    """A tick that could not do its work: one line, and the next tick tries again."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return SkipReason(f"{what}, will retry: {type(exc).__name__}: {first}")
