"""The web page in a real headless Chromium, and the Prometheus metrics, against a live server
holding a job whose workers have reported (through the internal routes, as workers do)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from tests.conftest import (
    LiveServer,
    UserClient,
    checkpoint_bytes,
    finished_autoattack_job,
    play_workers,
)

CHROMIUM = "/usr/bin/chromium"
# Trial key -> (beta, clean acc, robust acc). Beta 1's is dominated: it is not on the front.
RESULTS = {
    "trial_0000": (0.0, 0.95, 0.20),
    "trial_0001": (1.0, 0.85, 0.30),
    "trial_0002": (6.0, 0.88, 0.45),
}


@pytest.fixture
def finished_sweep(
    submit: Callable[..., dict[str, Any]], dispatch: Callable[[str], httpx.Client]
) -> str:
    job_id: str = submit(
        name="web-sweep",
        training={"method": "trades", "epochs": 2},
        sweep={"parameters": {"training.beta": {"grid": [0.0, 1.0, 6.0]}}},
    )["id"]
    play_workers(dispatch(job_id), job_id, RESULTS)
    return job_id


class ElementCounter(HTMLParser):
    """Tags, classes and text of a rendered DOM, as Chromium dumps it, and the text of each
    cell of each table with an id, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table" and dict(attrs).get("id"):
            self._table = str(dict(attrs)["id"])
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append(" ".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data.strip())

    def count(self, tag: str, **attrs: str) -> int:
        return sum(
            1 for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())
        )


def render(url: str) -> ElementCounter:
    """The page's DOM after its scripts ran, from a real headless Chromium."""
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    dom = ElementCounter()
    dom.feed(result.stdout)
    return dom


def test_the_page_shows_a_jobs_trials_curves_and_tradeoff(
    live_server: LiveServer, finished_sweep: str
) -> None:
    dom = render(f"{live_server.url}/#job={finished_sweep}&token={live_server.api_token}")
    text = " ".join(dom.text)

    assert "web-sweep" in text and "succeeded" in text
    # The trials table: one row per trial with its numbers, the best (by validation) starred.
    header, *rows = dom.tables["trials"]
    assert header[:5] == ["trial", "config", "status", "clean acc", "PGD-20 acc"]
    assert [row[:5] for row in rows] == [
        [
            f"{key}{' ★' if key == 'trial_0002' else ''}",
            f"beta={beta:g}",
            "succeeded",
            f"{100 * clean:.1f}%",
            f"{100 * robust:.1f}%",
        ]
        for key, (beta, clean, robust) in RESULTS.items()
    ]
    # Per-epoch curves: a clean and a robust line per trial.
    assert dom.count("svg", id="curves") == 1
    # The trade-off: a point per trial, and the Pareto front drawn through the two undominated.
    assert dom.count("svg", id="tradeoff") == 1
    assert dom.count("circle", **{"class": "point"}) == len(RESULTS)
    assert dom.count("path", **{"class": "front"}) == 1


def test_the_page_shows_autoattack_and_an_evaluate_jobs_curve(
    live_server: LiveServer,
    api: httpx.Client,
    submit: Callable[..., dict[str, Any]],
    dispatch: Callable[[str], httpx.Client],
) -> None:
    content = checkpoint_bytes()
    model = api.post(
        "/v1/models",
        params={"filename": "m.pt"},
        content=content,
        headers={"Content-Type": "application/octet-stream"},
    ).json()
    job_id: str = submit(
        name="web-curve",
        kind="evaluate",
        source={"model": model["id"]},
        evaluation={"epsilons": [0.05, 0.1], "autoattack": True},
    )["id"]
    worker = dispatch(job_id)
    after = {"clean": 0.9, "apgd-ce": 0.61, "apgd-t": 0.58, "fab-t": 0.58, "square": 0.57}
    autoattack = {"after_attack": after, "seconds": 12.0, "done": True, "unreliable": True}
    for epsilon, pgd, aa in [(0.05, 0.8, 0.7), (0.1, 0.65, 0.57)]:
        point = {"epsilon": epsilon, "clean_acc": 0.9, "robust_acc": pgd, "autoattack_acc": aa,
                 "autoattack": autoattack}  # fmt: skip
        response = worker.post(f"/v1/internal/jobs/{job_id}/trials/trial_0000/curve", json=point)
        assert response.status_code == 200, response.text
    trial = {"config": {}, "status": "succeeded", "clean_acc": 0.9, "robust_acc": 0.65,
             "autoattack_acc": 0.57, "autoattack": autoattack}  # fmt: skip
    assert (
        worker.put(f"/v1/internal/jobs/{job_id}/trials/trial_0000", json=trial).status_code == 200
    )

    dom = render(f"{live_server.url}/#job={job_id}&token={live_server.api_token}")
    header, trial = dom.tables["trials"]
    assert trial[header.index("AutoAttack acc")] == "57.0%"
    attacks = trial[header.index("after each attack")]
    assert attacks == (
        "clean 90.0% > apgd-ce 61.0% > apgd-t 58.0% > fab-t 58.0% > square 57.0% (12 s)"
        " ⚠ potentially unreliable"
    )
    assert dom.count("svg", id="curve") == 1
    assert [row[:4] for row in dom.tables["curve-points"][1:]] == [
        ["0.0500", "90.0%", "80.0%", "70.0%"],
        ["0.1000", "90.0%", "65.0%", "57.0%"],
    ]


def test_the_job_list_names_the_attack_of_each_best_robust_accuracy(
    live_server: LiveServer,
    submit: Callable[..., dict[str, Any]],
    dispatch: Callable[[str], httpx.Client],
    finished_sweep: str,
) -> None:
    # A job that ran AutoAttack is listed by AutoAttack's accuracy, not its (higher) PGD one.
    finished_autoattack_job(submit, dispatch, "web-autoattack")

    dom = render(f"{live_server.url}/#token={live_server.api_token}")
    header, *rows = dom.tables["jobs"]
    best_robust = {row[0]: row[header.index("best robust acc")] for row in rows}
    assert best_robust["web-autoattack"] == "52.0% AutoAttack (standard)"
    assert best_robust["web-sweep"] == "45.0% PGD-20"


def test_the_page_asks_for_a_token_and_shows_nothing_without_one(live_server: LiveServer) -> None:
    dom = render(f"{live_server.url}/")
    assert dom.count("form", id="login") == 1
    assert dom.count("table") == 0


def test_the_page_shows_a_user_their_own_jobs_and_an_admin_everyones(
    live_server: LiveServer, make_user: Callable[..., UserClient]
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    for user in (alice, bob):
        response = user.http.post("/v1/jobs", json={"name": f"{user.name}-job"})
        assert response.status_code == 201

    as_alice = render(f"{live_server.url}/#token={alice.token}")
    text = " ".join(as_alice.text)
    assert f"{alice.name}-job" in text and f"{bob.name}-job" not in text
    assert "Jobs (1)" in text
    assert as_alice.count("td", **{"class": "owner"}) == 1
    assert f"{alice.name} · " in as_alice.text  # who is signed in: a text node of its own
    assert as_alice.count("a", id="signout") == 1

    as_admin = render(f"{live_server.url}/#token={live_server.api_token}")
    admin_text = " ".join(as_admin.text)
    assert f"{alice.name}-job" in admin_text and f"{bob.name}-job" in admin_text
    assert "admin (admin) · " in as_admin.text


def scrape(live_server: LiveServer) -> str:
    response = httpx.get(f"{live_server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def sample(metrics: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = (
        rf"^{re.escape(name)}{{{re.escape(label_text)}}} (\S+)$"
        if labels
        else rf"^{re.escape(name)} (\S+)$"
    )
    match = re.search(pattern, metrics, re.MULTILINE)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


def test_prometheus_metrics_follow_the_jobs(
    live_server: LiveServer,
    api: httpx.Client,
    submit: Callable[..., dict[str, Any]],
    dispatch: Callable[[str], httpx.Client],
) -> None:
    """Every counter moves by exactly what was done between two scrapes."""

    def route_requests(metrics: str) -> float:
        """GET /v1/jobs/{job_id} answered 200, so far (none yet: no sample)."""
        labels = 'method="GET",route="/v1/jobs/{job_id}",status="200"'
        pattern = rf"^advorch_http_requests_total{{{re.escape(labels)}}} (\S+)$"
        match = re.search(pattern, metrics, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    before = scrape(live_server)
    job_id = submit(
        name="metrics-sweep",
        training={"method": "trades", "epochs": 2},
        sweep={"parameters": {"training.beta": {"grid": [0.0, 1.0, 6.0]}}},  # RESULTS' trials
    )["id"]
    queued = scrape(live_server)
    play_workers(dispatch(job_id), job_id, RESULTS, epochs=2)
    api.get(f"/v1/jobs/{job_id}")
    after = scrape(live_server)

    def moved(metrics: str, name: str, **labels: str) -> float:
        return sample(metrics, name, **labels) - sample(before, name, **labels)

    assert moved(queued, "advorch_jobs", status="queued") == 1
    assert moved(after, "advorch_jobs", status="queued") == 0
    assert moved(after, "advorch_jobs", status="succeeded") == 1
    assert moved(after, "advorch_trials", status="succeeded") == len(RESULTS)
    assert moved(after, "advorch_dispatch_latency_seconds_count") == 1
    assert moved(after, "advorch_epoch_metrics_posted_total") == 2 * len(RESULTS)
    # Requests are labelled by route template, not by raw path.
    assert route_requests(after) - route_requests(before) == 1
    assert f"/v1/jobs/{job_id}" not in after
