"""The job spec's validation, directly and through ``POST /v1/jobs``: every refusal names the
field at fault, and defaults are resolved so a job's spec says exactly what runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings
from workers.spec import JobSpec
from workers.sweep import halving_rungs

if TYPE_CHECKING:
    from tests.conftest import LiveServer


def grid_sweep(**parameters: list[Any]) -> dict[str, Any]:
    return {"parameters": {path: {"grid": values} for path, values in parameters.items()}}


# (what the spec sets, the field path the error must name)
INVALID_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"training": {"nope": 1}}, "training.nope"),
    ({"colour": "blue"}, "colour"),
    ({"training": {"epochs": "ten"}}, "training.epochs"),
    ({"training": {"epochs": 2.5}}, "training.epochs"),
    ({"training": {"epsilon": 0}}, "training.epsilon"),
    ({"training": {"epsilon": 1.5}}, "training.epsilon"),
    ({"training": {"attack_steps": 0}}, "training.attack_steps"),
    ({"evaluation": {"attack_steps": 0}}, "evaluation.attack_steps"),
    ({"training": {"method": "pgd_at", "beta": 6.0}}, "training.beta"),
    ({"training": {"method": "madry"}}, "training.method"),
    ({"dataset": {"name": "imagenet"}}, "dataset.name"),
    ({"sweep": grid_sweep(**{"training.nope": [1, 2]})}, "sweep.parameters.training.nope"),
    ({"sweep": grid_sweep(**{"model.arch": ["small_cnn"]})}, "sweep.parameters.model.arch"),
    ({"sweep": grid_sweep(**{"training.beta": []})}, "sweep.parameters.training.beta"),
    (
        {"sweep": grid_sweep(**{"training.epsilon": [0.1, 2.0]})},
        "sweep.parameters.training.epsilon",
    ),
    ({"sweep": {"parameters": {}}}, "sweep.parameters"),
    # AWP, EMA, MART and the epsilon warm-up (issue 12)
    ({"training": {"method": "fgsm_rs", "awp": {}}}, "training.awp"),
    ({"training": {"method": "mart", "awp": {"gamma": 0.005}}}, "training.awp"),
    ({"training": {"method": "standard", "awp": {}}}, "training.awp"),
    ({"training": {"method": "trades", "awp": {"gamma": -0.1}}}, "training.awp.gamma"),
    ({"training": {"method": "trades", "awp": {"gama": 0.1}}}, "training.awp.gama"),
    (
        {"training": {"method": "trades", "epochs": 3, "awp": {"warmup_epochs": 3}}},
        "training.awp.warmup_epochs",
    ),
    ({"training": {"ema": {"decay": 1.0}}}, "training.ema.decay"),
    ({"training": {"ema": {"warmup_steps": -1}}}, "training.ema.warmup_steps"),
    ({"training": {"ema": {"decy": 0.9}}}, "training.ema.decy"),
    ({"training": {"method": "fgsm_rs", "beta": 6.0}}, "training.beta"),
    ({"training": {"epochs": 2, "epsilon_warmup_epochs": 3}}, "training.epsilon_warmup_epochs"),
    ({"training": {"epsilon_warmup_epochs": -1}}, "training.epsilon_warmup_epochs"),
    (
        {"training": {"method": "standard", "epsilon_warmup_epochs": 1}},
        "training.epsilon_warmup_epochs",
    ),
    (
        {"training": {"method": "trades"}, "sweep": grid_sweep(**{"training.awp.gamma": [0, -1]})},
        "sweep.parameters.training.awp.gamma",
    ),
    (
        {"training": {"method": "trades"}, "sweep": grid_sweep(**{"training.awp.gama": [0.1]})},
        "sweep.parameters.training.awp.gama",
    ),
    (
        {"training": {"method": "mart"}, "sweep": grid_sweep(**{"training.awp.gamma": [0.01]})},
        "sweep.parameters.training.awp.gamma",
    ),
    (
        {"training": {"method": "pgd_at"}, "sweep": grid_sweep(**{"training.beta": [1.0]})},
        "sweep.parameters.training.beta",
    ),
    (
        {"sweep": grid_sweep(**{"training.ema.decay": [0.9, 1.5]})},
        "sweep.parameters.training.ema.decay",
    ),
    # Ray custom resources (issue 9)
    ({"resources": {"custom": {"second_node": 0}}}, "resources.custom.second_node"),
    ({"resources": {"custom": {"second_node": -1}}}, "resources.custom.second_node"),
    ({"resources": {"custom": {"second_node": "1"}}}, "resources.custom.second_node"),
    ({"resources": {"custom": {"": 1}}}, "resources.custom."),
    ({"resources": {"custom": {" ": 1}}}, "resources.custom. "),
    ({"resources": {"custom": {"x" * 129: 1}}}, f"resources.custom.{'x' * 129}"),
    ({"resources": {"custom": {"CPU": 1}}}, "resources.custom.CPU"),
    ({"resources": {"custom": {"gpu": 1}}}, "resources.custom.gpu"),
    ({"resources": {"custom": {"memory": 1e9}}}, "resources.custom.memory"),
    ({"resources": {"custom": {f"r{i}": 1 for i in range(17)}}}, "resources.custom"),
    ({"resources": {"custom": ["second_node"]}}, "resources.custom"),
    # Successive halving compares every trial at a rung: Optuna makes them one by one.
    (
        {
            "sweep": {
                "parameters": {"training.beta": {"choice": [1.0, 6.0]}},
                "search": "optuna",
                "scheduler": "halving",
            }
        },
        "sweep.scheduler",
    ),
]


@pytest.mark.parametrize(("spec", "field"), INVALID_SPECS)
def test_invalid_spec_error_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({"name": "bad", **spec})
    fields = [".".join(map(str, error["loc"])) for error in caught.value.errors()]
    assert field in fields


def test_defaults_are_resolved() -> None:
    spec = JobSpec.model_validate({"name": "defaults", "training": {"method": "trades"}})
    assert spec.training.beta == 6.0
    assert spec.training.step_size == pytest.approx(spec.training.epsilon / 4)
    assert spec.evaluation.epsilon == spec.training.epsilon
    assert spec.num_trials() == 1


def test_sweep_trial_count_is_grid_product_times_samples() -> None:
    sweep = grid_sweep(**{"training.beta": [0.5, 1.0, 3.0], "training.epsilon": [0.05, 0.1]})
    spec = JobSpec.model_validate(
        {"name": "sweep", "training": {"method": "trades"}, "sweep": {**sweep, "num_samples": 2}}
    )
    assert spec.num_trials() == 12


def test_stored_spec_validates_again_unchanged() -> None:
    """What the service stores (JSON) is what the dispatcher and workers read back."""
    spec = JobSpec.model_validate(
        {
            "name": "ranges",
            "training": {"method": "trades"},
            "sweep": {"parameters": {"training.beta": {"uniform": [0.5, 6.0]}}, "search": "random"},
        }
    )
    assert JobSpec.model_validate(spec.model_dump(mode="json")).model_dump() == spec.model_dump()


def test_each_trial_of_a_method_sweep_resolves_its_own_methods_defaults() -> None:
    spec = JobSpec.model_validate(
        {
            "name": "methods",
            "training": {"method": "fgsm_rs", "epsilon": 0.1},
            "sweep": grid_sweep(**{"training.method": ["fgsm_rs", "pgd_at", "trades"]}),
        }
    )
    trials = {
        m: spec.trial_spec({"training.method": m}).training for m in ("fgsm_rs", "pgd_at", "trades")
    }
    assert (trials["fgsm_rs"].step_size, trials["fgsm_rs"].attack_steps) == (0.125, 1)
    assert (trials["pgd_at"].step_size, trials["pgd_at"].attack_steps) == (0.025, 10)
    assert trials["pgd_at"].beta is None and trials["trades"].beta == 6.0
    # What the user set holds for every trial; beta only for the methods that have one.
    spec = JobSpec.model_validate(
        {
            "name": "methods",
            "training": {"method": "trades", "beta": 3.0, "attack_steps": 5},
            "sweep": grid_sweep(**{"training.method": ["trades", "pgd_at"]}),
        }
    )
    assert spec.trial_spec({"training.method": "trades"}).training.beta == 3.0
    pgd_at = spec.trial_spec({"training.method": "pgd_at"}).training
    assert (pgd_at.beta, pgd_at.attack_steps) == (None, 5)


def test_mart_awp_ema_and_warmup_defaults() -> None:
    training = JobSpec.model_validate(
        {
            "name": "new",
            "training": {"method": "mart", "ema": {}, "epsilon_warmup_epochs": 2},
        }
    ).training
    assert training.beta == 6.0
    assert training.ema is not None and (training.ema.decay, training.ema.warmup_steps) == (
        0.999,
        0,
    )
    assert training.awp is None and training.epsilon_warmup_epochs == 2
    awp = JobSpec.model_validate({"name": "awp", "training": {"awp": {}}}).training.awp
    assert awp is not None and (awp.gamma, awp.warmup_epochs) == (0.005, 0)
    plain = JobSpec.model_validate({"name": "plain"}).training
    assert (plain.awp, plain.ema, plain.epsilon_warmup_epochs) == (None, None, 0)


def test_a_sweep_over_nested_fields_sets_them_per_trial() -> None:
    """``training.awp.gamma`` turns AWP on in a spec without it, and keeps the other AWP field
    where the spec sets it; ``training.ema.decay`` likewise."""
    spec = JobSpec.model_validate(
        {
            "name": "awp-sweep",
            "training": {"method": "trades", "epochs": 4, "awp": {"warmup_epochs": 1}},
            "sweep": grid_sweep(
                **{"training.awp.gamma": [0, 0.005, 0.01], "training.ema.decay": [0.9, 0.99]}
            ),
        }
    )
    assert spec.num_trials() == 6
    trial = spec.trial_spec({"training.awp.gamma": 0.01, "training.ema.decay": 0.9}).training
    assert trial.awp is not None and (trial.awp.gamma, trial.awp.warmup_epochs) == (0.01, 1)
    assert trial.ema is not None and (trial.ema.decay, trial.ema.warmup_steps) == (0.9, 0)
    bare = JobSpec.model_validate(
        {
            "name": "bare",
            "training": {"method": "pgd_at"},
            "sweep": grid_sweep(**{"training.awp.gamma": [0.0, 0.02]}),
        }
    )
    awp = bare.trial_spec({"training.awp.gamma": 0.02}).training.awp
    assert awp is not None and (awp.gamma, awp.warmup_epochs) == (0.02, 0)


def test_a_method_sweep_gives_awp_and_beta_only_to_methods_that_take_them() -> None:
    spec = JobSpec.model_validate(
        {
            "name": "methods",
            "training": {"method": "trades", "beta": 3.0, "awp": {"gamma": 0.01}},
            "sweep": grid_sweep(**{"training.method": ["trades", "pgd_at", "mart", "fgsm_rs"]}),
        }
    )
    trials = {
        m: spec.trial_spec({"training.method": m}).training
        for m in ("trades", "pgd_at", "mart", "fgsm_rs")
    }
    assert trials["trades"].beta == 3.0 and trials["mart"].beta == 3.0
    assert trials["pgd_at"].beta is None and trials["fgsm_rs"].beta is None
    assert trials["trades"].awp is not None and trials["trades"].awp.gamma == 0.01
    assert trials["pgd_at"].awp is not None and trials["pgd_at"].awp.gamma == 0.01
    assert trials["mart"].awp is None and trials["fgsm_rs"].awp is None


def test_a_sweep_over_epsilon_keeps_the_step_ratio_and_one_evaluation_epsilon() -> None:
    spec = JobSpec.model_validate(
        {
            "name": "eps",
            "training": {"method": "trades", "epsilon": 0.1, "step_size": 0.02},
            "sweep": grid_sweep(**{"training.epsilon": [0.05, 0.2]}),
        }
    )
    trial = spec.trial_spec({"training.epsilon": 0.2})
    assert trial.training.step_size == pytest.approx(0.04)
    assert trial.evaluation.epsilon == 0.1


def test_repeats_each_have_their_own_seed() -> None:
    from workers.sweep import search_space

    grid = JobSpec.model_validate(
        {
            "name": "r",
            "training": {"seed": 7},
            "sweep": {**grid_sweep(**{"training.epochs": [1, 2]}), "num_samples": 3},
        }
    )
    assert grid.num_trials() == 6
    assert search_space(grid)["training.seed"] == {"grid_search": [7, 8, 9]}
    assert grid.sampled_trial_seed(4) is None  # a grid's seeds are in its configs
    sampled = JobSpec.model_validate(
        {
            "name": "r",
            "training": {"seed": 7},
            "sweep": {
                "parameters": {"training.epochs": {"choice": [1, 2]}},
                "search": "random",
                "num_samples": 3,
            },
        }
    )
    assert "training.seed" not in search_space(sampled)
    assert [sampled.sampled_trial_seed(n) for n in range(3)] == [7, 8, 9]


EVALUATE_JOB: dict[str, Any] = {"name": "e", "kind": "evaluate", "source": {"model": "a" * 32}}


def test_an_evaluate_job_resolves_its_curve() -> None:
    spec = JobSpec.model_validate({**EVALUATE_JOB, "evaluation": {"epsilons": [0.3, 0.1]}})
    assert spec.evaluation.epsilons == [0.1, 0.3]
    assert spec.evaluation.epsilon == 0.3  # the headline numbers: the largest epsilon
    assert spec.evaluation.step_size_at(0.1) == pytest.approx(0.025)
    spec = JobSpec.model_validate(
        {**EVALUATE_JOB, "evaluation": {"epsilon": 0.2, "epsilons": [0.1]}}
    )
    assert spec.evaluation.epsilons == [0.1, 0.2]  # the headline epsilon is on the curve


INVALID_EVALUATE_JOBS: list[tuple[dict[str, Any], str]] = [
    ({"name": "e", "kind": "evaluate"}, "source"),
    ({**EVALUATE_JOB, "training": {"epochs": 3}}, "training"),
    ({**EVALUATE_JOB, "source": {"job": "a" * 32}}, "source"),
    ({**EVALUATE_JOB, "source": {"model": "a" * 32, "trial": "t"}}, "source"),
    ({**EVALUATE_JOB, "evaluation": {"epsilons": [0.1, 0.1]}}, "evaluation.epsilons"),
    ({**EVALUATE_JOB, "resources": {"num_workers": 2}}, "resources.num_workers"),
    ({"name": "t", "source": {"model": "a" * 32}}, "source"),
    ({"name": "t", "evaluation": {"epsilons": [0.1]}}, "evaluation.epsilons"),
    ({"name": "t", "evaluation": {"autoattack_examples": 0}}, "evaluation.autoattack_examples"),
    ({"name": "t", "training": {"attack_bn": "frozen"}}, "training.attack_bn"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID_EVALUATE_JOBS)
def test_what_only_one_kind_of_job_takes_is_refused_naming_the_field(
    spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(spec)
    assert field in [".".join(map(str, error["loc"])) for error in caught.value.errors()]


def test_custom_resources_reach_ray_where_the_training_runs() -> None:
    """One worker: the trial's own process trains (Train's local mode), so Tune reserves the
    custom resources for it; several: each Train worker reserves them, the trial's process
    only its memory."""
    from workers.sweep import TRIAL_DRIVER_RESOURCES, trial_resources
    from workers.trial import scaling_config

    custom = {"second_node": 0.5, "node:10.0.0.2": 0.01}
    one = JobSpec.model_validate({"name": "one", "resources": {"custom": custom}})
    assert trial_resources(one, use_gpu=False) == {
        "cpu": 1.0,
        "gpu": 0,
        "custom_resources": custom,
    }
    assert scaling_config(one, use_gpu=False).num_workers == 0

    resources = {"num_workers": 2, "cpus_per_worker": 0.5, "custom": custom}
    two = JobSpec.model_validate({"name": "two", "resources": resources})
    assert trial_resources(two, use_gpu=False) == TRIAL_DRIVER_RESOURCES
    scaling = scaling_config(two, use_gpu=False)
    assert scaling.num_workers == 2
    assert scaling.resources_per_worker == {"CPU": 0.5, **custom}
    # Stored and read back (the dispatcher hands workers the JSON), the mapping is the same.
    assert JobSpec.model_validate_json(two.model_dump_json()).resources.custom == custom


def test_normalisation_is_on_for_cifar10_and_off_elsewhere_unless_set() -> None:
    assert JobSpec(name="c", dataset={"name": "cifar10"}).model.normalize is True  # type: ignore[arg-type]
    assert JobSpec(name="d").model.normalize is False
    assert JobSpec(name="d", model={"normalize": True}).model.normalize is True  # type: ignore[arg-type]


# --- through the API ---


def assert_invalid(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert field in [f["field"] for f in error["fields"]]
    assert field in error["message"]


@pytest.mark.parametrize(("spec", "field"), INVALID_SPECS)
def test_api_refuses_invalid_spec_naming_the_field(
    api: httpx.Client, spec: dict[str, Any], field: str
) -> None:
    assert_invalid(api.post("/v1/jobs", json={"name": "bad", **spec}), field)


# (a spec just over the live server's limits, the field path the error must name)
OVER_LIMITS: list[tuple[Callable[[Settings], dict[str, Any]], str]] = [
    (lambda limits: {"training": {"epochs": limits.max_epochs + 1}}, "training.epochs"),
    (lambda limits: {"training": {"batch_size": limits.max_batch_size + 1}}, "training.batch_size"),
    (
        lambda limits: {"resources": {"num_workers": limits.max_workers + 1}},
        "resources.num_workers",
    ),
    (
        lambda limits: {"resources": {"cpus_per_worker": limits.max_cpus_per_worker + 0.5}},
        "resources.cpus_per_worker",
    ),
    (
        lambda limits: {"training": {"attack_steps": limits.max_attack_steps + 1}},
        "training.attack_steps",
    ),
    (
        lambda limits: {"evaluation": {"attack_steps": limits.max_eval_attack_steps + 1}},
        "evaluation.attack_steps",
    ),
    (lambda limits: {"evaluation": {"restarts": limits.max_restarts + 1}}, "evaluation.restarts"),
    (
        lambda limits: {
            "resources": {"custom": {"tpu_v9": limits.max_custom_resource_per_worker + 1}}
        },
        "resources.custom.tpu_v9",
    ),
    (
        lambda limits: {"sweep": grid_sweep(**{"training.epochs": [1, limits.max_epochs + 1]})},
        "sweep.parameters.training.epochs",
    ),
    (
        lambda limits: {
            "sweep": {**grid_sweep(**{"training.seed": [0, 1]}), "num_samples": limits.max_trials}
        },
        "sweep",
    ),
]


@pytest.mark.parametrize(
    ("over_limit", "field"), [pytest.param(*case, id=case[1]) for case in OVER_LIMITS]
)
def test_api_refuses_spec_over_the_server_limits(
    api: httpx.Client,
    live_server: LiveServer,
    over_limit: Callable[[Settings], dict[str, Any]],
    field: str,
) -> None:
    spec = {"name": "too-big", **over_limit(live_server.settings)}
    assert_invalid(api.post("/v1/jobs", json=spec), field)


def test_api_accepts_spec_at_the_server_limits(
    live_server: LiveServer, submit: Callable[..., dict[str, Any]]
) -> None:
    limits = live_server.settings
    job = submit(
        training={"epochs": limits.max_epochs, "batch_size": limits.max_batch_size},
        resources={"num_workers": limits.max_workers},
        sweep={**grid_sweep(**{"training.seed": [0, 1]}), "num_samples": limits.max_trials // 2},
    )
    assert job["num_trials"] == limits.max_trials


def test_api_returns_the_resolved_spec(
    api: httpx.Client, submit: Callable[..., dict[str, Any]]
) -> None:
    written = {"name": "resolved", "training": {"method": "trades", "epsilon": 0.1}}
    job = submit(**written)
    read_back = api.get(f"/v1/jobs/{job['id']}").json()["spec"]
    assert read_back == JobSpec.model_validate(written).model_dump(mode="json")
    assert read_back["training"]["beta"] == 6.0
    assert read_back["training"]["step_size"] == pytest.approx(0.025)
    assert read_back["evaluation"]["epsilon"] == 0.1


def test_api_refuses_a_body_that_is_not_json(api: httpx.Client) -> None:
    response = api.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_invalid(response, "body")


@pytest.mark.parametrize(
    ("epochs", "rungs"),
    [(1, ()), (2, (1,)), (3, (1,)), (4, (1, 2)), (8, (2, 4)), (12, (3, 6)), (30, (7, 15))],
)
def test_halving_compares_trials_after_a_quarter_and_a_half_of_the_epochs(
    epochs: int, rungs: tuple[int, ...]
) -> None:
    assert halving_rungs(epochs) == rungs
