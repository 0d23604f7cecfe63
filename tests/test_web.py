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

from tests.conftest import LiveServer, UserClient, play_workers

CHROMIUM = "/usr/bin/chromium"
# Trial key -> (beta, clean acc, robust acc). beta_1 is dominated: it is not on the front.
RESULTS = {"beta_0": (0.0, 0.95, 0.20), "beta_1": (1.0, 0.85, 0.30), "beta_6": (6.0, 0.88, 0.45)}


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
    """Tags, classes and text of a rendered DOM, as Chromium dumps it."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

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
    # The trials table: one row per trial with its numbers, the best (by robust acc) starred.
    assert dom.count("tr") == 1 + len(RESULTS)
    for clean, robust in [(c, r) for _, c, r in RESULTS.values()]:
        assert f"{100 * clean:.1f}%" in text and f"{100 * robust:.1f}%" in text
    assert "beta_6 ★" in text
    # Per-epoch curves: a clean and a robust line per trial.
    assert dom.count("svg", id="curves") == 1
    # The trade-off: a point per trial, and the Pareto front drawn through the two undominated.
    assert dom.count("svg", id="tradeoff") == 1
    assert dom.count("circle", **{"class": "point"}) == len(RESULTS)
    assert dom.count("path", **{"class": "front"}) == 1


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
    finished_sweep: str,
) -> None:
    before = scrape(live_server)
    queued = sample(before, "advorch_jobs", status="queued")
    submit(name="one-more")
    api.get(f"/v1/jobs/{finished_sweep}")
    after = scrape(live_server)

    assert sample(after, "advorch_jobs", status="queued") == queued + 1
    assert sample(after, "advorch_jobs", status="succeeded") >= 1
    assert sample(after, "advorch_trials", status="succeeded") >= len(RESULTS)
    assert sample(after, "advorch_dispatch_latency_seconds_count") >= 1
    assert sample(after, "advorch_epoch_metrics_posted_total") >= 2 * len(RESULTS)
    # Requests are labelled by route template, not by raw path.
    assert (
        sample(
            after,
            "advorch_http_requests_total",
            method="GET",
            route="/v1/jobs/{job_id}",
            status="200",
        )
        >= 1
    )
    assert f"/v1/jobs/{finished_sweep}" not in after
