"""Workers posting metrics at scale (issue 10): 200 simulated trials, each posting one epoch's
metrics every second for 60 s, against ``advorch serve``, on PostgreSQL and on SQLite.

    python bench/metrics_load.py                          # both databases, this working tree
    python bench/metrics_load.py --rev main               # and revision `main`, in the same run
    python bench/metrics_load.py --database postgres --trials 200 --seconds 60

Each trial is one keep-alive HTTP connection, as a Ray worker's client is; the trials are 4 jobs
of 50 (the per-job limit a user has by default is 64), started over the first second so that
posts spread evenly. A post is an error when it fails or is answered anything but 200. The
load generator is asyncio on raw sockets (cheaper than an HTTP library, so it takes less of
the 2 cores from the server). No Ray runs (as in bench/api_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_load import (
    REPO,
    TOKEN,
    checkout,
    load_average,
    serve,
    spec,
    tree_cpu_s,
    worker_token,
)

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TRIALS_PER_JOB = 50
# A post unanswered after this is an error (a worker's own client gives up after 30 s).
POST_TIMEOUT_S = 10.0
# Posting stops this long after the last post was due: a service that falls behind (the base
# revision's pool timed out under this load) must not hold the run for many minutes.
GRACE_S = 30.0


@contextmanager
def database(kind: str) -> Iterator[str | None]:
    """None (SQLite under the service's home) or the URL of a PostgreSQL database made for
    this run and dropped after it."""
    if kind == "sqlite":
        yield None
        return
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"advorch_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def post_forever(
    host: str,
    port: int,
    job_id: str,
    key: str,
    seconds: int,
    start_at: float,
    outcome: Outcome,
) -> None:
    """One trial: a connection, and a post of epoch n at ``start_at + n - 1`` s."""
    token = worker_token(job_id)
    path = f"/v1/internal/jobs/{job_id}/trials/{key}/metrics"
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for epoch in range(1, seconds + 1):
            delay = start_at + epoch - 1 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = json.dumps(
                {
                    "epoch": epoch,
                    "train_loss": 1.0 / epoch,
                    "train_acc": 0.5,
                    "val_clean_acc": 0.6,
                    "val_robust_acc": 0.3,
                    "lr": 0.1,
                    "epoch_seconds": 1.0,
                    "images_per_second": 1000.0,
                }
            ).encode()
            request = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            sent = time.perf_counter()
            try:
                writer.write(request)
                status, _ = await asyncio.wait_for(read_response(reader), POST_TIMEOUT_S)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
                outcome.errors.append(f"{type(err).__name__}: {err}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            outcome.latencies_ms.append((time.perf_counter() - sent) * 1000)
            if status != 200:
                outcome.errors.append(f"HTTP {status}")
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def make_jobs(url: str, trials: int, seconds: int) -> list[tuple[str, str]]:
    """Jobs enough for ``trials`` trials of ``seconds`` epochs; their (job id, trial key)s."""
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < trials:
        count = min(TRIALS_PER_JOB, trials - len(pairs))
        body = spec(f"metrics-load-{len(pairs)}", trials=count, epochs=seconds)
        job_id = admin.post("/v1/jobs", json=body).raise_for_status().json()["id"]
        pairs += [(job_id, f"trial_{n:04d}") for n in range(count)]
    return pairs


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def run(label: str, code: Path, kind: str, args: argparse.Namespace) -> str:
    with database(kind) as url, serve(code, url, {}) as server:
        pairs = make_jobs(server.url, args.trials, args.seconds)
        parts = urlsplit(server.url)
        assert parts.hostname is not None and parts.port is not None
        outcome = Outcome()
        load = load_average()
        cpu_before = tree_cpu_s(server.process.pid)

        async def all_trials() -> None:
            start = time.monotonic() + 1
            posting = asyncio.gather(
                *(
                    post_forever(
                        parts.hostname or "",
                        parts.port or 0,
                        job_id,
                        key,
                        args.seconds,
                        start + random.random(),
                        outcome,
                    )
                    for job_id, key in pairs
                )
            )
            try:
                await asyncio.wait_for(posting, args.seconds + 1 + GRACE_S)
            except TimeoutError:
                outcome.errors.append(f"posting stopped {GRACE_S:.0f} s after its end")

        began = time.monotonic()
        asyncio.run(all_trials())
        wall_s = time.monotonic() - began
        cpu_s = tree_cpu_s(server.process.pid) - cpu_before
        stored = check_stored(server.url, pairs)
    lat = outcome.latencies_ms
    expected = args.trials * args.seconds
    row = (
        f"| {label} | {kind} | {len(lat):,} of {expected:,} | {len(outcome.errors)} | "
        f"{percentile(lat, 50):.1f} ms | {percentile(lat, 99):.1f} ms | "
        f"{max(lat, default=float('nan')):.0f} ms | {len(lat) / wall_s:.0f}/s | "
        f"{cpu_s / wall_s * 100:.0f}% | {stored} | {load} |"
    )
    if outcome.errors:
        print(f"{label} {kind}: first errors: {outcome.errors[:5]}", flush=True)
    print(row, flush=True)
    return row


def check_stored(url: str, pairs: list[tuple[str, str]]) -> str:
    """How many epochs the service has stored, read back over the API (a sample of trials,
    scaled up: reading back all 12,000 rows one trial at a time would take a while)."""
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    sample = pairs[:: max(1, len(pairs) // 20)]
    try:
        stored = sum(
            len(admin.get(f"/v1/jobs/{job_id}/trials/{key}/metrics").raise_for_status().json())
            for job_id, key in sample
        )
    except httpx.HTTPError as err:
        return f"unreadable ({type(err).__name__})"
    return f"{round(stored * len(pairs) / len(sample)):,}"


HEADER = (
    "| code | database | posts answered | errors | p50 | p99 | max | rate | server CPU "
    "(of one core) | epochs stored | load avg before |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", action="append", default=[], help="also run this git revision")
    parser.add_argument(
        "--database", choices=["postgres", "sqlite", "both"], default="both", help="default: both"
    )
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    kinds = ["postgres", "sqlite"] if args.database == "both" else [args.database]
    print(f"load average {load_average()}; {time.strftime('%F %T %Z')}")
    print(HEADER, flush=True)
    rows = []
    for rev in args.rev:
        with checkout(rev) as code:
            rows += [run(rev, code, kind, args) for kind in kinds]
    rows += [run("this tree", REPO, kind, args) for kind in kinds]
    print("\n" + HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
