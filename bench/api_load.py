"""API throughput: ``hey`` against a running ``advorch serve`` (issue 10).

    python bench/api_load.py                      # this working tree
    python bench/api_load.py --rev main           # and revision `main`, in the same run
    python bench/api_load.py --database-url postgresql+psycopg://postgres@127.0.0.1/test

For each revision it starts ``advorch serve`` from that revision's code (a ``git worktree``
of it in a temporary folder, run with this venv) on a fresh home, seeds it over the API (a job
with 4 trials of 3 epochs each, finished, and 30 more jobs for the list), then runs, one route
at a time, ``hey -z <duration> -c <clients>`` (Debian's ``hey``, installed with apt-get when
missing) and prints requests per second and latency percentiles, one table for all.

No Ray runs: ADVORCH_RAY_ADDRESS names a port where nothing listens, so the dispatcher only
logs that it cannot reach Ray and leaves the jobs queued. What is measured is the API alone,
with the load generator on the same machine (as the issue's targets are stated).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
SECRET = "bench-secret-key"
TRIALS = 4
EPOCHS = 3
LIST_JOBS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_token(job_id: str) -> str:
    """service.auth.worker_token, under the secret the bench gives the service."""
    return f"{job_id}.{hmac.new(SECRET.encode(), job_id.encode(), hashlib.sha256).hexdigest()}"


def spec(name: str, *, trials: int = TRIALS, epochs: int = EPOCHS) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": {"name": "digits"},
        "model": {"arch": "small_cnn"},
        "training": {"method": "trades", "epochs": epochs, "batch_size": 64},
        "sweep": {"parameters": {"training.beta": {"grid": [float(b) for b in range(trials)]}}},
    }


def ensure_hey() -> str:
    path = shutil.which("hey")
    if path is None:
        print("installing hey (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "hey"], check=True, env=env)
        path = shutil.which("hey")
    assert path is not None
    return path


@contextmanager
def checkout(rev: str | None) -> Iterator[Path]:
    """The code of ``rev`` (None: this working tree, uncommitted changes included)."""
    if rev is None:
        yield REPO
        return
    folder = Path(tempfile.mkdtemp(prefix="advorch-bench-rev-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), rev],
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], check=False
        )


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    home: Path


@contextmanager
def serve(code: Path, database_url: str | None, extra_env: dict[str, str]) -> Iterator[Server]:
    home = Path(tempfile.mkdtemp(prefix="advorch-bench-home-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADVORCH_", "RAY_"))}
    env |= {
        "PYTHONPATH": str(code),
        "ADVORCH_HOME": str(home),
        "ADVORCH_PORT": str(port),
        "ADVORCH_API_TOKEN": TOKEN,
        "ADVORCH_SECRET_KEY": SECRET,
        "ADVORCH_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",  # no Ray: the API alone
        "ADVORCH_DISPATCH_INTERVAL_S": "5",
        **({"ADVORCH_DATABASE_URL": database_url} if database_url else {}),
        **extra_env,
    }
    log = (home / "serve.log").open("wb")
    command = [sys.executable, "-c", "from service.cli import main; main()", "serve"]
    process = subprocess.Popen(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError((home / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.3)
        yield Server(url=url, process=process, home=home)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:  # requests stuck in flight (the base's pool)
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def seed(url: str) -> str:
    """A finished-looking job (4 trials, 3 epochs of metrics each, final results) and 30 more
    jobs; returns the first job's id."""
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    job_id = admin.post("/v1/jobs", json=spec("bench-job")).raise_for_status().json()["id"]
    worker = httpx.Client(
        base_url=f"{url}/v1/internal/jobs/{job_id}",
        headers={"Authorization": f"Bearer {worker_token(job_id)}"},
        timeout=30,
    )
    for t in range(TRIALS):
        key = f"trial_{t:04d}"
        worker.put(
            f"/trials/{key}", json={"config": {"training.beta": float(t)}, "status": "running"}
        ).raise_for_status()
        for epoch in range(1, EPOCHS + 1):
            metrics = {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "train_acc": 0.5 + 0.1 * epoch,
                "val_clean_acc": 0.6 + 0.05 * epoch,
                "val_robust_acc": 0.3 + 0.05 * epoch,
                "lr": 0.1,
                "epoch_seconds": 1.5,
                "images_per_second": 900.0,
            }
            worker.post(f"/trials/{key}/metrics", json=metrics).raise_for_status()
        final = {
            "config": {"training.beta": float(t)},
            "status": "succeeded",
            "clean_acc": 0.8,
            "robust_acc": 0.4 + 0.01 * t,
            "best_epoch": EPOCHS,
            "val_clean_acc": 0.75,
            "val_robust_acc": 0.45 + 0.01 * t,
        }
        worker.put(f"/trials/{key}", json=final).raise_for_status()
    for n in range(LIST_JOBS):
        admin.post("/v1/jobs", json=spec(f"bench-list-{n}", trials=2)).raise_for_status()
    return job_id


@dataclass
class Result:
    label: str
    route: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    non_200: int
    load: str


HEY_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
HEY_PCT = re.compile(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"))
HEY_STATUS = re.compile(r"\[(\d+)\]\s+(\d+) responses")


def run_hey(hey: str, url: str, *, duration_s: int, clients: int, auth: bool) -> dict[str, Any]:
    command = [hey, "-z", f"{duration_s}s", "-c", str(clients)]
    if auth:
        command += ["-H", f"Authorization: Bearer {TOKEN}"]
    out = subprocess.run([*command, url], check=True, capture_output=True, text=True).stdout
    rps_match = HEY_RPS.search(out)
    if rps_match is None:
        raise RuntimeError(f"hey printed no rate:\n{out}")
    percentiles = {int(p): float(s) * 1000 for p, s in HEY_PCT.findall(out)}
    statuses = {int(code): int(n) for code, n in HEY_STATUS.findall(out)}
    return {
        "rps": float(rps_match.group(1)),
        "p50": percentiles.get(50, float("nan")),
        "p99": percentiles.get(99, float("nan")),
        "non_200": sum(n for code, n in statuses.items() if code != 200),
    }


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and every live process under it:
    the server's cost per request, which the machine's other load barely changes."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid ... utime (14th field overall) stime (15th)
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        total += stats.get(pid, (0, 0.0))[1]
        frontier += [child for child, (ppid, _) in stats.items() if ppid == pid]
    return total


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bench(
    label: str, code: Path, args: argparse.Namespace, hey: str, extra_env: dict[str, str]
) -> list[Result]:
    results = []
    with serve(code, args.database_url, extra_env) as server:
        job_id = seed(server.url)
        routes = [
            ("GET /v1/jobs/{id}", f"/v1/jobs/{job_id}", True),
            ("GET /v1/jobs?limit=20", "/v1/jobs?limit=20", True),
            ("GET /healthz", "/healthz", False),
        ]
        for route, path, auth in routes:
            load = load_average()
            cpu_before = tree_cpu_s(server.process.pid)
            figures = run_hey(
                hey, server.url + path, duration_s=args.duration, clients=args.clients, auth=auth
            )
            cpu_ms = (tree_cpu_s(server.process.pid) - cpu_before) * 1000
            served = figures["rps"] * args.duration
            result = Result(
                label, route, figures["rps"], figures["p50"], figures["p99"],
                cpu_ms / served if served else float("nan"), figures["non_200"], load,
            )  # fmt: skip
            print(format_row(result), flush=True)
            results.append(result)
    return results


def format_row(r: Result) -> str:
    return (
        f"| {r.label} | `{r.route}` | {r.requests_per_s:,.0f} | {r.p50_ms:.1f} ms | "
        f"{r.p99_ms:.1f} ms | {r.cpu_ms_per_request:.2f} ms | {r.non_200} | {r.load} |"
    )


HEADER = (
    "| code | route | req/s | p50 | p99 | server CPU per request | non-200 | load avg before |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", action="append", default=[], help="also run this git revision")
    parser.add_argument("--database-url", default=None, help="default: SQLite under the home")
    parser.add_argument("--duration", type=int, default=15, help="seconds per route")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for this tree's service"
    )
    args = parser.parse_args()
    hey = ensure_hey()
    extra_env = dict(item.split("=", 1) for item in args.env)
    print(f"{os.cpu_count()} CPUs; load average {load_average()}; {time.strftime('%F %T %Z')}")
    print(HEADER, flush=True)
    results: list[Result] = []
    for rev in args.rev:
        with checkout(rev) as code:
            results += bench(rev, code, args, hey, {})
    label = "this tree" + (f" ({' '.join(args.env)})" if args.env else "")
    results += bench(label, REPO, args, hey, extra_env)
    print("\n" + HEADER)
    for result in results:
        print(format_row(result))


if __name__ == "__main__":
    main()
