"""Reading an inference job's files (docs/PROTOCOL.md section 5.14) without torch: what `fedsync status` and
`fedsync verify` need, and the first look of the submitter and the workers."""

from __future__ import annotations

from fedsync.storage import names
from fedsync.storage.markers import JobMarker, JobPlan
from fedsync.storage.share import Share


def list_jobs(share: Share) -> list[str]:
    """The job folders in the share, by name."""
    return sorted(e.name for e in share.list(names.JOBS) if e.folder and names.WORKER_NAME.match(e.name))


def read_job(share: Share, job: str) -> JobMarker:
    """job.yaml; MarkerError (or an OSError) while it is absent, not synced whole, or another job's."""
    marker = share.read_record(JobMarker, names.job_marker(job))
    if marker.job != job:
        raise ValueError(f"{names.job_marker(job)} names job {marker.job!r}")
    return marker


def read_plan(share: Share, job: str) -> JobPlan | None:
    """plan.yaml; None while it is absent or not synced whole."""
    try:
        plan = share.read_record(JobPlan, names.job_plan(job))
    except Exception:  # noqa: BLE001 - absent or not whole yet: no plan to follow
        return None
    return plan if plan.job == job else None
