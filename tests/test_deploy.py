"""The deployment files: no Docker engine runs here, so the compose wiring and the example specs
are checked by reading them."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from workers.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume name -> mount path inside the container."""
    return dict(entry.split(":")[:2] for entry in service.get("volumes", []))


def test_every_service_has_an_image_and_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", "api"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
    for name in ("postgres", "ray-head", "api"):
        assert services[name]["healthcheck"]["test"], name


def test_api_is_wired_to_postgres_and_the_ray_head(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["api"]["environment"]

    database = urlparse(env["ADVORCH_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg"
    assert database.hostname == "postgres"
    assert database.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert database.username == services["postgres"]["environment"]["POSTGRES_USER"]

    ray = urlparse(env["ADVORCH_RAY_ADDRESS"])
    assert ray.hostname == "ray-head"
    assert f"--dashboard-port={ray.port}" in services["ray-head"]["command"]
    assert "--dashboard-host=0.0.0.0" in services["ray-head"]["command"]

    assert urlparse(env["ADVORCH_PUBLIC_URL"]).hostname == "api"
    assert {"postgres", "ray-head"} <= set(services["api"]["depends_on"])
    for dependency in services["api"]["depends_on"].values():
        assert dependency["condition"] == "service_healthy"


def test_ray_nodes_share_one_auth_token(compose: dict[str, Any]) -> None:
    services = compose["services"]
    tokens = {
        services[name]["environment"]["RAY_AUTH_TOKEN"]
        for name in ("ray-head", "ray-worker", "api")
    }
    assert len(tokens) == 1
    for name in ("ray-head", "ray-worker", "api"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
    assert services["ray-worker"]["command"].split("--address=")[1].startswith("ray-head:")


def test_workers_reserve_gpus(compose: dict[str, Any]) -> None:
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        "gpu" in device["capabilities"] and device["driver"] == "nvidia" for device in devices
    )


def test_checkpoints_are_on_a_volume_shared_by_api_and_every_ray_node(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert {"pgdata", "checkpoints", "datasets"} <= set(compose["volumes"])
    assert _mounts(services["postgres"])["pgdata"] == "/var/lib/postgresql/data"
    env = services["api"]["environment"]
    for name in ("api", "ray-head", "ray-worker"):
        mounts = _mounts(services[name])
        assert mounts["checkpoints"] == env["ADVORCH_STORAGE_URI"], name
        assert mounts["datasets"] == env["ADVORCH_DATA_DIR"], name


def test_dockerfile_installs_every_package_the_services_run() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("api", "service", "workers", "migrations", "alembic.ini", "pyproject.toml"):
        assert path in dockerfile
    assert "torchvision" not in dockerfile


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_valid_specs(path: Path) -> None:
    spec = JobSpec.model_validate(yaml.safe_load(path.read_text()))
    assert spec.name


def test_paper_recipes_use_the_fields_attack_settings() -> None:
    assert len(EXAMPLES) == 3
    for name in ("pgd_at_cifar10_preactresnet18", "trades_cifar10_wrn34"):
        spec = JobSpec.model_validate(
            yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
        )
        assert spec.dataset.name == "cifar10"
        assert spec.training.epsilon == pytest.approx(8 / 255)
        assert spec.training.step_size == pytest.approx(2 / 255)
        assert spec.training.attack_steps == 10
        assert spec.evaluation.attack_steps >= 20
    sweep = JobSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "trades_beta_sweep.yaml").read_text())
    )
    assert (sweep.dataset.name, sweep.model.arch, sweep.training.method) == (
        "digits",
        "small_cnn",
        "trades",
    )
    assert sweep.num_trials() == 4
