"""The job spec: the contract users write, the service validates and stores, and workers run.

One set of pydantic models, strict: unknown fields and wrong types are errors, and every error
carries the path of the field (``training.epsilon``). Defaults fill what is left out and are
*resolved* here (``step_size``, ``attack_steps``, ``beta``, the evaluation epsilon, the model's
input normalisation), so the stored spec says exactly what ran. Policy limits (max epochs,
trials, workers, batch size) are the service's settings and are checked there, not here.

A job is of one of two kinds:

    train     (the default) a sweep of training trials, each evaluated on the test split
    evaluate  no training: attack one given model at a list of epsilons (a robustness curve)

A spec also keeps the document it was made from (``submitted()``): a trial of a sweep is the
*submitted* spec with the trial's overrides, resolved again, so that a trial of another method
or epsilon gets that method's defaults, not the base method's (see ``trial_spec``).

This module imports only pydantic, so the API can validate specs without torch or Ray.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

Method = Literal["standard", "pgd_at", "trades", "fgsm_rs", "mart"]
ADVERSARIAL_METHODS: frozenset[str] = frozenset({"pgd_at", "trades", "fgsm_rs", "mart"})
# The methods whose loss weighs a robustness term by beta, and beta's default for each: 6.0 in
# both papers' CIFAR-10 runs (Zhang et al. 2019; Wang et al. 2020, YisenWang/MART).
BETA_DEFAULTS: dict[str, float] = {"trades": 6.0, "mart": 6.0}
# The methods AWP is defined for here: the two of the AWP paper's (Wu et al. 2020) own code
# (AT_AWP and trades_AWP in csdongxian/AWP).
AWP_METHODS: frozenset[str] = frozenset({"pgd_at", "trades"})
# The training fields only some methods take, and those methods.
METHOD_ONLY_FIELDS: dict[str, frozenset[str]] = {
    "beta": frozenset(BETA_DEFAULTS),
    "awp": AWP_METHODS,
}
# The attack's steps when the spec leaves them out: 10 in training (Rice et al. use PGD-10,
# TRADES 10 steps); FGSM-RS is one step by definition.
DEFAULT_ATTACK_STEPS = 10
# The field that tells a sweep's repeats apart: each repeat has its own seed.
SEED_PATH = "training.seed"
# An evaluate job's trial config holds the architecture of the model it attacked under this
# path: its spec's model.arch is only the default, since the model comes from its source.
ARCH_PATH = "model.arch"
# The most epsilons one evaluate job attacks at.
MAX_CURVE_POINTS = 32
# Custom Ray resources a spec may ask for, and how long their names may be.
MAX_CUSTOM_RESOURCES = 16
MAX_RESOURCE_NAME_LENGTH = 128
# The resources Ray itself defines (lower case): the spec asks for CPUs and GPUs by their own
# fields, and Tune reads "cpu", "gpu" and "memory" of a resource dict as these.
RAY_BUILTIN_RESOURCES = frozenset({"cpu", "gpu", "memory", "object_store_memory"})

# Strict types, but a whole number is accepted where a float is expected (YAML writes 1 for 1.0).
PositiveFloat = Annotated[float, Field(gt=0)]
Epsilon = Annotated[float, Field(gt=0, le=1)]
# [low, high]. JSON and YAML have no tuples, and a stored spec (model_dump(mode="json")) must
# validate again, so a two-item list is taken too.
Range = Annotated[
    tuple[float, float], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]
# A job id (32 hex digits) or a trial key (trial_0003): what an evaluate job's source names.
JobId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
TrialKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
ModelId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


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
    # The data set's normalisation (workers.data.NORMALIZATIONS) as the model's first layer, so
    # that attacks keep working on pixels in [0, 1]; None resolves to on for cifar10, as its
    # recipes train, and off for the others (their pixels are used as they are).
    normalize: bool | None = None


class OptimizerSpec(StrictModel):
    """SGD with Nesterov off, as in the PGD-AT and TRADES papers."""

    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5.0e-4


class AWPSpec(StrictModel):
    """Adversarial Weight Perturbation (Wu et al. 2020, "Adversarial Weight Perturbation Helps
    Robust Generalization"; workers.awp): each step, the weights are moved by ``gamma`` times
    each layer's norm in the direction that raises the adversarial loss, the gradient is taken
    there, and the step applied to the unperturbed weights."""

    # The perturbation's size relative to each layer's weight norm; 0.005 is the paper's choice
    # for TRADES-AWP and AT-AWP on CIFAR-10 (L-inf). 0 turns AWP off (so a sweep can compare).
    gamma: Annotated[float, Field(ge=0, le=1)] = 0.005
    # Epochs trained without AWP before it starts (the official code's --awp-warmup, which
    # counts from 1: its 10 is 9 epochs without; here, warmup_epochs 9).
    warmup_epochs: Annotated[int, Field(ge=0)] = 0


class EMASpec(StrictModel):
    """An exponential moving average of the weights (Gowal et al. 2020, "Uncovering the Limits of
    Adversarial Training against Norm-Bounded Adversarial Examples"; Rebuffi et al. 2021):
    ``avg = decay * avg + (1 - decay) * weights`` after every optimizer step (workers.ema)."""

    decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    # For the first warmup_steps optimizer steps the average is the weights themselves (decay 0),
    # so that it does not average in the random initialisation; then it decays at ``decay``.
    warmup_steps: Annotated[int, Field(ge=0)] = 0


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
    # None resolves to 10; FGSM-RS always takes 1.
    attack_steps: Annotated[int, Field(ge=1)] | None = None
    # TRADES and MART only; None resolves to 6.0 (BETA_DEFAULTS) for them, stays None otherwise.
    beta: Annotated[float, Field(ge=0)] | None = None
    # Adversarial Weight Perturbation (pgd_at and trades only); None: off.
    awp: AWPSpec | None = None
    # An exponential moving average of the weights; when on, validation, the best epoch, the
    # checkpoint and the test evaluation are all of the average. None: off.
    ema: EMASpec | None = None
    # A linear ramp of the training epsilon and its step size from 0 to their values over the
    # first N epochs, step by step (workers.training.warmup_scale). Evaluation always attacks at
    # the job's full evaluation epsilon. 0: no warm-up.
    epsilon_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    # BatchNorm while the training attack runs: "eval" uses the running statistics and leaves
    # them alone (the TRADES code); "train" uses the batch's statistics and updates the running
    # ones, as Rice et al.'s and Wong et al.'s scripts do (their model stays in train mode).
    attack_bn: Literal["eval", "train"] = "eval"
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _resolve_defaults(self) -> TrainingSpec:
        if self.beta is not None and self.method not in BETA_DEFAULTS:
            message = f"beta is a parameter of trades and mart; method {self.method!r} has none"
            raise field_error(("beta",), message, self.beta)
        if self.awp is not None and self.method not in AWP_METHODS:
            message = f"awp is for methods pgd_at and trades, not {self.method!r}"
            raise field_error(("awp",), message, self.awp.model_dump())
        if self.awp is not None and self.awp.warmup_epochs >= self.epochs:
            message = f"AWP would never start: must be below training.epochs ({self.epochs})"
            raise field_error(("awp", "warmup_epochs"), message, self.awp.warmup_epochs)
        if self.epsilon_warmup_epochs > 0 and self.method not in ADVERSARIAL_METHODS:
            message = f"method {self.method!r} trains on clean inputs: it has no epsilon to warm up"
            raise field_error(("epsilon_warmup_epochs",), message, self.epsilon_warmup_epochs)
        if self.epsilon_warmup_epochs > self.epochs:
            message = f"must be at most training.epochs ({self.epochs})"
            raise field_error(("epsilon_warmup_epochs",), message, self.epsilon_warmup_epochs)
        if self.beta is None and self.method in BETA_DEFAULTS:
            self.beta = BETA_DEFAULTS[self.method]
        if self.step_size is None:
            self.step_size = 1.25 * self.epsilon if self.method == "fgsm_rs" else self.epsilon / 4
        if self.method == "fgsm_rs":
            self.attack_steps = 1
        elif self.attack_steps is None:
            self.attack_steps = DEFAULT_ATTACK_STEPS
        return self


class EvaluationSpec(StrictModel):
    """How trials (or an evaluate job's model) are attacked on the test split: PGD at one fixed
    epsilon per job, so every trial of a sweep compares, and optionally AutoAttack."""

    # None resolves to the job's base training.epsilon (before any sweep override).
    epsilon: Epsilon | None = None
    # None resolves to epsilon / 4 (2/255 at 8/255, as the field reports PGD-20).
    step_size: PositiveFloat | None = None
    attack_steps: Annotated[int, Field(ge=1)] = 20
    restarts: Annotated[int, Field(ge=1)] = 1
    # AutoAttack "standard" (Croce and Hein 2020, their own code: pyautoattack) after PGD.
    autoattack: bool = False
    # The first N test images AutoAttack attacks; None: the whole test split.
    autoattack_examples: Annotated[int, Field(ge=1)] | None = None
    # Evaluate jobs only: the epsilons of the robustness curve, which always holds ``epsilon``
    # (the job's headline numbers; by default the curve's largest epsilon).
    epsilons: Annotated[list[Epsilon], Field(min_length=1, max_length=MAX_CURVE_POINTS)] | None = (
        None
    )

    @model_validator(mode="after")
    def _distinct_epsilons(self) -> EvaluationSpec:
        if self.epsilons is not None:
            if len(set(self.epsilons)) != len(self.epsilons):
                raise field_error(("epsilons",), "epsilons must be distinct", self.epsilons)
            self.epsilons = sorted(self.epsilons)
        return self

    def step_size_at(self, epsilon: float) -> float:
        """The PGD step at ``epsilon``: the job's step-size-to-epsilon ratio (1/4 by default)."""
        assert self.epsilon is not None and self.step_size is not None, "resolved by JobSpec"
        return self.step_size / self.epsilon * epsilon


class SourceSpec(StrictModel):
    """The model an evaluate job attacks: the best checkpoint of an earlier trial
    (``job`` and ``trial``) or a model file uploaded to ``POST /v1/models`` (``model``)."""

    job: JobId | None = None
    trial: TrialKey | None = None
    model: ModelId | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SourceSpec:
        if self.model is not None and (self.job is not None or self.trial is not None):
            raise ValueError("give either model, or job and trial, not both")
        if self.model is None and (self.job is None or self.trial is None):
            raise ValueError("give model (an uploaded model's id), or both job and trial")
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
    # Repeats of the grid (grid search) or samples drawn (random, optuna); each repeat trains
    # with its own seed: training.seed plus the repeat's index.
    num_samples: Annotated[int, Field(ge=1)] = 1
    # fifo: every trial to its end; asha and halving stop weak trials early (workers.sweep).
    scheduler: Literal["fifo", "asha", "halving"] = "fifo"
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
        if self.scheduler == "halving" and self.search == "optuna":
            # Optuna proposes each trial from the results so far; a rung waits for every trial.
            message = "halving compares every trial at each rung: use grid or random search"
            raise field_error(("scheduler",), message, self.scheduler)
        return self

    def num_trials(self) -> int:
        """How many trials the sweep expands to: every grid combination, num_samples times."""
        grid_sizes = [len(s.grid) for s in self.parameters.values() if s.grid is not None]
        return math.prod(grid_sizes) * self.num_samples

    def repeats_by_seed(self) -> bool:
        """Whether a grid's repeats are a grid over the seed (unless the sweep sets seeds)."""
        return self.search == "grid" and self.num_samples > 1 and SEED_PATH not in self.parameters


class ResourcesSpec(StrictModel):
    num_workers: Annotated[int, Field(ge=1)] = 1
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: PositiveFloat = 1.0
    # Ray custom resources each worker reserves, name -> amount ({"second_node": 1}): what
    # pins trials to the nodes that declare them (`ray start --resources`). A trial's process
    # reserves them when it trains itself (one worker), each Train worker otherwise.
    custom: dict[str, float] = Field(default_factory=dict, max_length=MAX_CUSTOM_RESOURCES)

    @model_validator(mode="after")
    def _check_custom(self) -> ResourcesSpec:
        for name, amount in self.custom.items():
            loc = ("custom", name)
            if not name.strip() or len(name) > MAX_RESOURCE_NAME_LENGTH:
                message = f"a resource name is 1-{MAX_RESOURCE_NAME_LENGTH} characters, not blank"
                raise field_error(loc, message, name)
            if name.lower() in RAY_BUILTIN_RESOURCES:
                # Ray's own resources have their own fields; here they would reserve twice.
                message = f"{name!r} is Ray's own resource: use cpus_per_worker or use_gpu"
                raise field_error(loc, message, name)
            if not (amount > 0 and math.isfinite(amount)):
                raise field_error(loc, "the amount must be a number > 0", amount)
        return self


# The sections only a training job has; an evaluate job that gives one is refused.
TRAINING_ONLY_SECTIONS = ("model", "training", "sweep")


class JobSpec(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    kind: Literal["train", "evaluate"] = "train"
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
    # Evaluate jobs only: the model to attack.
    source: SourceSpec | None = None

    # The document this spec was validated from, as given (see ``submitted``).
    _submitted: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_submitted(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> JobSpec:
        spec: JobSpec = handler(data)
        if isinstance(data, JobSpec):  # already validated: it keeps its own
            return spec
        if isinstance(data, str | bytes):
            data = json.loads(data)
        spec._submitted = copy.deepcopy(data) if isinstance(data, dict) else spec.model_dump()
        return spec

    @model_validator(mode="after")
    def _resolve_and_check(self) -> JobSpec:
        if self.kind == "evaluate" and self.evaluation.epsilon is None and self.evaluation.epsilons:
            # An evaluate job's headline numbers: at the curve's largest epsilon, unless given.
            self.evaluation.epsilon = self.evaluation.epsilons[-1]
        if self.evaluation.epsilon is None:
            self.evaluation.epsilon = self.training.epsilon
        if self.evaluation.step_size is None:
            self.evaluation.step_size = self.evaluation.epsilon / 4
        if self.model.normalize is None:
            self.model.normalize = self.dataset.name == "cifar10"
        if self.kind == "evaluate":
            self._check_evaluate_job()
        else:
            self._check_training_job()
        return self

    def _check_training_job(self) -> None:
        if self.source is not None:
            raise field_error(("source",), "only an evaluate job takes a source", "source")
        if self.evaluation.epsilons is not None:
            message = "only an evaluate job takes a list of epsilons; use evaluation.epsilon"
            raise field_error(("evaluation", "epsilons"), message, self.evaluation.epsilons)
        if self.sweep is not None:
            self._check_sweep_values(self.sweep)

    def _check_evaluate_job(self) -> None:
        if self.source is None:
            message = "an evaluate job needs the model to attack: {model: ID} or {job, trial}"
            raise field_error(("source",), message, None)
        for section in TRAINING_ONLY_SECTIONS:
            if section in self.model_fields_set:
                message = "an evaluate job trains nothing; the model comes from its source"
                raise field_error((section,), message, section)
        if self.resources.num_workers != 1:
            message = "an evaluate job runs on one worker"
            raise field_error(("resources", "num_workers"), message, self.resources.num_workers)
        # The curve holds the headline epsilon too.
        epsilons = set(self.evaluation.epsilons or []) | {self.evaluation.epsilon}
        self.evaluation.epsilons = sorted(epsilons)  # type: ignore[arg-type]

    def _check_sweep_values(self, sweep: SweepSpec) -> None:
        """Every value a sweep can give must make a valid trial: a bad grid value is an error
        at submission, naming the parameter, not a failed trial an hour later."""
        schema = TrainingSpec.model_json_schema()
        method_space = sweep.parameters.get("training.method")
        methods = set(method_space.candidate_values()) if method_space else {self.training.method}
        for path, space in sweep.parameters.items():
            loc = ("sweep", "parameters", path)
            if not _has_path(schema, path.split(".")[1:]):
                raise field_error(loc, "names no training field", path)
            # A method-only field goes only to the trials whose method has it (trial_spec):
            # swept where no trial's method has it, it would silently change nothing.
            field = path.split(".")[1]
            takes = METHOD_ONLY_FIELDS.get(field)
            if takes is not None and not methods & takes:
                message = (
                    f"no trial's method ({', '.join(sorted(map(str, methods)))}) takes {field}"
                )
                raise field_error(loc, message, path)
            for value in space.candidate_values():
                try:
                    self.trial_spec({path: value})
                except ValidationError as err:
                    reason = "; ".join(
                        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()
                    )
                    raise field_error(loc, f"value {value!r} is invalid ({reason})", value) from err

    def submitted(self) -> dict[str, Any]:
        """The document as the user wrote it, defaults not filled in: what workers are given,
        so each trial resolves its own defaults."""
        return copy.deepcopy(self._submitted)

    def num_trials(self) -> int:
        return 1 if self.sweep is None else self.sweep.num_trials()

    def sampled_trial_seed(self, trial_number: int) -> int | None:
        """The seed of a sampled trial (random or optuna search, several samples): each draws
        its own, training.seed plus its number. None where the search or the config sets it."""
        sweep = self.sweep
        if sweep is None or sweep.search == "grid" or sweep.num_samples == 1:
            return None
        if SEED_PATH in sweep.parameters:
            return None
        return self.training.seed + trial_number

    def trial_spec(self, overrides: dict[str, Any]) -> JobSpec:
        """The spec one trial runs: the submitted spec with dotted-path fields replaced
        (``{"training.beta": 3.0}``), resolved again, without the sweep.

        Defaults follow the trial's own values: a ``pgd_at`` trial of a sweep based on
        ``fgsm_rs`` takes PGD's step size and steps, and beta and awp go only to the methods
        that have them. A sweep over training.epsilon keeps the step-size-to-epsilon ratio
        (epsilon / 4 unless the spec sets step_size; then the spec's ratio), unless it sweeps
        training.step_size too. The evaluation stays the job's, so trials of a sweep over
        training.epsilon are all attacked at the same radius and compare.
        """
        data = self.submitted()
        data.pop("sweep", None)
        data["evaluation"] = self.evaluation.model_dump()
        training = data.setdefault("training", {})
        new_epsilon = overrides.get("training.epsilon")
        if (
            new_epsilon is not None
            and "step_size" in training
            and "training.step_size" not in overrides
        ):
            ratio = self.training.step_size / self.training.epsilon  # type: ignore[operator]
            training["step_size"] = ratio * new_epsilon
        for path, value in overrides.items():
            data = _set_path(data, path.split("."), value)
        # Method-only fields go only to the trials of methods that have them, so that a sweep
        # over training.method may set them for the methods that take them.
        method = data["training"].get("method", "pgd_at")
        for field, methods in METHOD_ONLY_FIELDS.items():
            if method not in methods:
                data["training"].pop(field, None)
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
