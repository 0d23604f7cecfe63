"""The job spec: the contract users write, the service validates and stores, and workers run.

One set of pydantic models, strict: unknown fields and wrong types are errors, and every error
carries the path of the field (``training.epsilon``). Defaults fill what is left out and are
*resolved* here (``step_size``, ``beta``, the evaluation epsilon), so the stored spec says
exactly what ran. Policy limits (max epochs, trials, workers, batch size) are the service's
settings and are checked there, not here.

This module imports only pydantic, so the API can validate specs without torch or Ray.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

Method = Literal["standard", "pgd_at", "trades", "fgsm_rs"]
ADVERSARIAL_METHODS: frozenset[str] = frozenset({"pgd_at", "trades", "fgsm_rs"})

# Strict types, but a whole number is accepted where a float is expected (YAML writes 1 for 1.0).
PositiveFloat = Annotated[float, Field(gt=0)]
Epsilon = Annotated[float, Field(gt=0, le=1)]
# [low, high]. JSON and YAML have no tuples, and a stored spec (model_dump(mode="json")) must
# validate again, so a two-item list is taken too.
Range = Annotated[
    tuple[float, float], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def field_error(loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """A validation error located at ``loc`` below the model that raises it, so a rule that
    spans fields still names the one at fault (``training.beta``, not ``training``)."""
    error = PydanticCustomError("value_error", message)
    return ValidationError.from_exception_data(
        "JobSpec", [InitErrorDetails(type=error, loc=loc, input=value)]
    )


class DatasetSpec(StrictModel):
    name: Literal["digits", "cifar10", "synthetic"] = "digits"


class ModelSpec(StrictModel):
    arch: Literal["small_cnn", "preact_resnet18", "wrn_34_10"] = "small_cnn"


class OptimizerSpec(StrictModel):
    """SGD with Nesterov off, as in the PGD-AT and TRADES papers."""

    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5.0e-4


class TrainingSpec(StrictModel):
    method: Method = "pgd_at"
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 128
    optimizer: OptimizerSpec = OptimizerSpec()
    lr_schedule: Literal["cosine", "piecewise", "constant"] = "cosine"
    epsilon: Epsilon = 8 / 255
    # None resolves to the field's usual choice: epsilon / 4 for PGD (2/255 at 8/255) and TRADES,
    # 1.25 * epsilon for FGSM-RS (Wong et al. 2020).
    step_size: PositiveFloat | None = None
    attack_steps: Annotated[int, Field(ge=1)] = 10
    # TRADES only; None resolves to 6.0 (Zhang et al.) for trades and stays None otherwise.
    beta: Annotated[float, Field(ge=0)] | None = None
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _resolve_defaults(self) -> TrainingSpec:
        if self.beta is not None and self.method != "trades":
            raise field_error(
                ("beta",), f"beta is a TRADES parameter; method {self.method!r} has none", self.beta
            )
        if self.method == "trades" and self.beta is None:
            self.beta = 6.0
        if self.step_size is None:
            self.step_size = 1.25 * self.epsilon if self.method == "fgsm_rs" else self.epsilon / 4
        if self.method == "fgsm_rs":
            self.attack_steps = 1
        return self


class EvaluationSpec(StrictModel):
    """PGD on the test split at one fixed epsilon per job, so every trial of a sweep compares."""

    # None resolves to the job's base training.epsilon (before any sweep override).
    epsilon: Epsilon | None = None
    # None resolves to epsilon / 4 (2/255 at 8/255, as the field reports PGD-20).
    step_size: PositiveFloat | None = None
    attack_steps: Annotated[int, Field(ge=1)] = 20
    restarts: Annotated[int, Field(ge=1)] = 1
    autoattack: bool = False

    @model_validator(mode="after")
    def _no_unmeasured_autoattack(self) -> EvaluationSpec:
        if self.autoattack:
            # Never report a robust accuracy we did not attack for: there is no AutoAttack here yet.
            raise field_error(
                ("autoattack",),
                "AutoAttack is not available yet; use attack_steps and restarts",
                True,
            )
        return self


class ParameterSpace(StrictModel):
    """Exactly one of: a grid of values, a choice to sample from, or a [low, high] range."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: Range | None = None
    loguniform: Range | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ParameterSpace:
        given = [
            k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and not values:
            raise ValueError(f"{given[0]} must not be empty")
        bounds = self.uniform or self.loguniform
        if bounds is not None:
            low, high = bounds
            if not low < high:
                raise ValueError("range must be [low, high] with low < high")
            if self.loguniform is not None and low <= 0:
                raise ValueError("loguniform bounds must be positive")
        return self

    def candidate_values(self) -> list[Any]:
        """The values to validate against the field: every listed value, or a range's ends."""
        for values in (self.grid, self.choice, self.uniform, self.loguniform):
            if values is not None:
                return list(values)
        raise AssertionError("unreachable: validated to have one kind")


class SweepSpec(StrictModel):
    parameters: dict[str, ParameterSpace] = Field(min_length=1)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: Annotated[int, Field(ge=1)] = 1
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: Literal["robust_acc", "clean_acc"] = "robust_acc"
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _search_fits_spaces(self) -> SweepSpec:
        for path, space in self.parameters.items():
            loc = ("parameters", path)
            if not path.startswith("training."):
                raise field_error(loc, "a sweep parameter must name a training field", path)
            if self.search == "optuna" and space.grid is not None:
                raise field_error(loc, "optuna search samples; use choice instead of grid", path)
        return self

    def num_trials(self) -> int:
        """How many trials the sweep expands to: every grid combination, num_samples times."""
        grid_sizes = [len(s.grid) for s in self.parameters.values() if s.grid is not None]
        return math.prod(grid_sizes) * self.num_samples


class ResourcesSpec(StrictModel):
    num_workers: Annotated[int, Field(ge=1)] = 1
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: PositiveFloat = 1.0


class JobSpec(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    sweep: SweepSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    # The dispatcher's order: every queued high job before normal ones, normal before low; among
    # jobs of one priority, the user with the fewest jobs on Ray goes first. Only admins may
    # submit high (the service checks that: a spec knows no users).
    priority: Literal["low", "normal", "high"] = "normal"

    @model_validator(mode="after")
    def _resolve_and_check_sweep(self) -> JobSpec:
        if self.evaluation.epsilon is None:
            self.evaluation.epsilon = self.training.epsilon
        if self.evaluation.step_size is None:
            self.evaluation.step_size = self.evaluation.epsilon / 4
        if self.sweep is not None:
            self._check_sweep_values(self.sweep)
        return self

    def _check_sweep_values(self, sweep: SweepSpec) -> None:
        """Every value a sweep can give must make a valid trial: a bad grid value is an error
        at submission, naming the parameter, not a failed trial an hour later."""
        schema = TrainingSpec.model_json_schema()
        for path, space in sweep.parameters.items():
            loc = ("sweep", "parameters", path)
            if not _has_path(schema, path.split(".")[1:]):
                raise field_error(loc, "names no training field", path)
            for value in space.candidate_values():
                try:
                    self.trial_spec({path: value})
                except ValidationError as err:
                    reason = "; ".join(
                        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()
                    )
                    raise field_error(loc, f"value {value!r} is invalid ({reason})", value) from err

    def num_trials(self) -> int:
        return 1 if self.sweep is None else self.sweep.num_trials()

    def trial_spec(self, overrides: dict[str, Any]) -> JobSpec:
        """The spec one trial runs: this one with dotted-path fields replaced
        (``{"training.beta": 3.0}``), revalidated, and no sweep.

        The evaluation epsilon stays the job's, so trials of a sweep over training.epsilon
        are all attacked at the same radius and compare. A sweep over training.epsilon keeps
        the step-size-to-epsilon ratio, unless it sweeps training.step_size too.
        """
        data = self.model_dump()
        data["sweep"] = None
        new_epsilon = overrides.get("training.epsilon")
        if new_epsilon is not None and "training.step_size" not in overrides:
            ratio = self.training.step_size / self.training.epsilon  # type: ignore[operator]
            data["training"]["step_size"] = ratio * new_epsilon
        for path, value in overrides.items():
            data = _set_path(data, path.split("."), value)
        return JobSpec.model_validate(data)


def grid_combinations(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid parameters (what Tune's grid_search expands to)."""
    grids = {path: s.grid for path, s in sweep.parameters.items() if s.grid is not None}
    return [dict(zip(grids, values, strict=True)) for values in itertools.product(*grids.values())]


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``data[k0][k1]...`` set to ``value``."""
    head, *rest = keys
    out = dict(data)
    out[head] = _set_path(dict(out.get(head) or {}), rest, value) if rest else value
    return out


def _has_path(schema: dict[str, Any], keys: list[str]) -> bool:
    """Whether a JSON schema (with $defs) has the nested property ``keys``."""
    defs = schema.get("$defs", {})
    node: dict[str, Any] = schema
    for key in keys:
        props = node.get("properties", {})
        if key not in props:
            return False
        node = props[key]
        ref = node.get("$ref") or next(
            (a["$ref"] for a in node.get("anyOf", []) if "$ref" in a), None
        )
        if ref:
            node = defs[ref.rsplit("/", 1)[-1]]
    return True
