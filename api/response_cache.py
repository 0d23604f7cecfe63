"""Serialised job pages, kept per API process and served again while the job is unchanged.

``GET /v1/jobs/{id}`` is what clients poll. Loading a job with its trials through the ORM and
serialising it was most of that request's cost; whether the job changed is one small query
instead (:func:`service.jobs.job_stamp`): the job's version, and its trials' count and summed
versions. Every write to a job or a trial goes through the ORM, which bumps the row's version
(the optimistic-locking column), and trials are never deleted but with their job, so the stamp
changes whenever anything the page shows does; the bytes kept under an older stamp are never
served again.
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import end_read
from api.schemas import JobPublic
from service import jobs, users
from service.jobs import JobStamp
from service.models import Job, JobStatus, User


class JobPageCache:
    """The last serialised page of up to ``max_entries`` jobs (least recently used goes)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._max_entries = max_entries
        self._pages: OrderedDict[str, tuple[JobStamp, bytes]] = OrderedDict()
        self._lock = Lock()  # filled from threads and read from the event loop

    def get(self, job_id: str, stamp: JobStamp) -> bytes | None:
        with self._lock:
            entry = self._pages.get(job_id)
            if entry is None or entry[0] != stamp:
                return None
            self._pages.move_to_end(job_id)
            return entry[1]

    def put(self, job_id: str, stamp: JobStamp, page: bytes) -> None:
        with self._lock:
            current = self._pages.get(job_id)
            if current is not None and current[0] > stamp:
                return  # a newer page is there already (stamps only grow)
            self._pages[job_id] = (stamp, page)
            self._pages.move_to_end(job_id)
            while len(self._pages) > self._max_entries:
                self._pages.popitem(last=False)


async def read_job_page(session: Session, job_id: str, caller: User, pages: JobPageCache) -> bytes:
    """The job's page (JobPublic as JSON) if ``caller`` may see it: from ``pages`` while the
    job's stamp is the one it was kept under, else loaded (with its trials, one query),
    serialised and kept. Each database step is one thread hop that gives its connection back."""

    def stamp() -> tuple[int, JobStamp] | None:
        found = jobs.job_stamp(session, job_id)
        end_read(session)
        return found

    def load() -> Job:
        job = jobs.get_job(session, job_id, with_trials=True)
        end_read(session)
        return job

    found = await run_in_threadpool(stamp)
    jobs.ensure_visible(job_id, None if found is None else found[0], caller)
    assert found is not None
    page = pages.get(job_id, found[1])
    if page is None:
        job = await run_in_threadpool(load)
        # Serialising is CPU work: here in the event loop (a thread would only add a hop).
        page = JobPublic.from_job(job).model_dump_json().encode()
        pages.put(job_id, JobStamp.of(job), page)
    return page


async def read_job_list_page(
    session: Session,
    caller: User,
    *,
    owner: str | None,
    status: JobStatus | None,
    limit: int,
    offset: int,
    pages: JobPageCache,
) -> bytes:
    """A page of the job list (JobPage as JSON): the jobs' stamps in one query, the pages of
    jobs kept under those stamps as they are, the others loaded (one query for them all) and
    kept."""

    def stamps() -> tuple[list[tuple[str, JobStamp]], int]:
        owner_id = users.owner_filter(session, caller, owner)
        found = jobs.list_job_stamps(
            session, status=status, limit=limit, offset=offset, owner_id=owner_id
        )
        end_read(session)
        return found

    def load(job_ids: list[str]) -> list[Job]:
        loaded = jobs.jobs_with_trials(session, job_ids)
        end_read(session)
        return loaded

    listed, total = await run_in_threadpool(stamps)
    kept: dict[str, bytes | None] = {job_id: pages.get(job_id, stamp) for job_id, stamp in listed}
    missing = [job_id for job_id, page in kept.items() if page is None]
    if missing:
        for job in await run_in_threadpool(load, missing):
            fresh = JobPublic.from_job(job).model_dump_json().encode()
            kept[job.id] = fresh
            pages.put(job.id, JobStamp.of(job), fresh)
    # A job deleted between the two queries is left out (none is, today: jobs stay).
    items = b",".join(page for page in kept.values() if page is not None)
    # JobPage's JSON, as pydantic writes it (compact, fields in order), around the kept items.
    tail = f'],"total":{total},"limit":{limit},"offset":{offset}}}'.encode()
    return b'{"items":[' + items + tail
