"""Persistent background jobs run by in-process worker threads.

Jobs live in the ``jobs`` table, so they outlive the process: a job found ``running`` at start-up
was cut short by a crash or a stop and is queued again. Every job kind is written to be re-run
safely (ingestion skips what it already stored, re-embedding skips items already embedded), so
resuming is simply running again. Workers poll the table, claim a job with a conditional update
(``queued`` -> ``running``) and check for cancellation and shutdown between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from service.db.session import transaction
from service.db.tables import Job, JobError, utcnow

if TYPE_CHECKING:
    from service.state import ServiceState

logger = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
POLL_INTERVAL_S = 1.0


class JobCancelledError(Exception):
    """The job was cancelled by a client."""


class JobInterruptedError(Exception):
    """The service is stopping; the job will resume at the next start."""


class JobFailedError(Exception):
    """The job cannot go on; the message is shown to the client as the job's error."""


class JobContext:
    """What a job handler gets: its parameters, progress reporting and the stop/cancel checks."""

    def __init__(self, runner: JobRunner, job: Job) -> None:
        self._runner = runner
        self.state = runner.state
        self.job_id = job.id
        self.kind = job.kind
        self.gallery_id = job.gallery_id
        self.params: dict[str, Any] = dict(job.params or {})
        self.done = 0
        self.failed = 0
        self.skipped = 0
        self.total: int | None = job.total
        self._last_flush = 0.0

    def check(self) -> None:
        """Raise if the job should stop now (cancelled, or the service is shutting down)."""
        if self._runner.stopping.is_set():
            raise JobInterruptedError
        if self.job_id in self._runner.cancelled:
            raise JobCancelledError

    def set_total(self, total: int) -> None:
        self.total = total
        self.flush(force=True)

    def advance(self, *, done: int = 0, failed: int = 0, skipped: int = 0) -> None:
        self.done += done
        self.failed += failed
        self.skipped += skipped
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Write the counters (at most a few times a second unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_flush < 0.25:
            return
        self._last_flush = now
        with transaction(self.state.sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(
                    done=self.done,
                    failed=self.failed,
                    skipped=self.skipped,
                    total=self.total,
                    updated_at=utcnow(),
                )
            )

    def record_errors(self, errors: list[tuple[str, str]]) -> None:
        """Record inputs the job could not process (source, message); they count as failed."""
        if not errors:
            return
        with transaction(self.state.sessions) as session:
            session.add_all(JobError(job_id=self.job_id, source=src, error=msg[:2000]) for src, msg in errors)


Handler = Callable[[JobContext], dict[str, Any] | None]


class JobRunner:
    """Worker threads that run queued jobs.

    Args:
        state: the service state (database, models, indexes).
        handlers: job kind -> function running one job; it may return a dict merged into the
            job's parameters under ``result``.
        workers: jobs run at the same time.
    """

    def __init__(self, state: ServiceState, handlers: dict[str, Handler], *, workers: int = 1) -> None:
        self.state = state
        self.handlers = handlers
        self.workers = workers
        self.stopping = threading.Event()
        self.cancelled: set[int] = set()
        #: The jobs running now, by id: their live counters (read by the metrics at scrape time).
        self.active: dict[int, JobContext] = {}
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Queue again the jobs a previous process left running, then start the workers."""
        with transaction(self.state.sessions) as session:
            resumed = session.execute(
                update(Job).where(Job.status == "running").values(status="queued", updated_at=utcnow())
            ).rowcount
            for (job_id,) in session.execute(
                select(Job.id).where(Job.status == "queued", Job.cancel_requested.is_(True))
            ):
                self.cancelled.add(job_id)
        if resumed:
            logger.info("resuming %d job(s) interrupted by the previous shutdown or crash", resumed)
        for n in range(self.workers):
            thread = threading.Thread(target=self._loop, name=f"reid-job-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask running jobs to stop at their next batch (they resume at the next start) and wait."""
        self.stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def wake(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def cancel(self, job_id: int) -> str:
        """Cancel a job: at once when queued, at its next batch when running. Returns the new status."""
        with transaction(self.state.sessions) as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise KeyError(job_id)
            if job.status in TERMINAL:
                return job.status
            job.cancel_requested = True
            if job.status == "queued":
                job.status = "cancelled"
                job.finished_at = utcnow()
            status = job.status
        self.cancelled.add(job_id)
        return status

    def _claim(self) -> Job | None:
        with transaction(self.state.sessions) as session:
            candidates = session.scalars(
                select(Job).where(Job.status == "queued").order_by(Job.id).limit(5)
            ).all()
            for job in candidates:
                claimed = session.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == "queued")
                    .values(
                        status="running",
                        started_at=utcnow(),
                        attempts=Job.attempts + 1,
                        done=0,
                        failed=0,
                        skipped=0,
                        error=None,
                        updated_at=utcnow(),
                    )
                ).rowcount
                if claimed:
                    # A resumed job starts its counters afresh: its inputs are counted again as
                    # they are skipped (already stored) or processed.
                    session.execute(JobError.__table__.delete().where(JobError.job_id == job.id))
                    session.flush()
                    session.refresh(job)
                    return job
        return None

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self._claim()
            except Exception:
                logger.exception("could not claim a job; retrying")
                job = None
            if job is None:
                self._wake.wait(POLL_INTERVAL_S)
                self._wake.clear()
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        handler = self.handlers.get(job.kind)
        ctx = JobContext(self, job)
        self.active[job.id] = ctx
        status, error, result = "failed", None, None
        logger.info("job %d (%s) started (attempt %d)", job.id, job.kind, job.attempts)
        try:
            if handler is None:
                raise JobFailedError(f"no handler for job kind {job.kind!r}")
            ctx.check()
            result = handler(ctx)
            status = "succeeded"
        except JobInterruptedError:
            status = "queued"
            logger.info("job %d interrupted by shutdown; it resumes at the next start", job.id)
        except JobCancelledError:
            status = "cancelled"
        except JobFailedError as exc:
            error = str(exc)
        except Exception as exc:
            logger.exception("job %d (%s) failed", job.id, job.kind)
            error = f"{type(exc).__name__}: {exc}"
        try:
            ctx.flush(force=True)
            with transaction(self.state.sessions) as session:
                row = session.get(Job, job.id)
                if row is not None:
                    row.status = status
                    row.error = error
                    if status != "queued":
                        row.finished_at = utcnow()
                    if result:
                        row.params = {**(row.params or {}), "result": result}
        except Exception:
            logger.exception("could not record the end of job %d", job.id)
        self.cancelled.discard(job.id)
        self.active.pop(job.id, None)
        logger.info("job %d (%s) %s%s", job.id, job.kind, status, f": {error}" if error else "")
