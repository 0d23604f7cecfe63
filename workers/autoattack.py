"""AutoAttack (Croce and Hein, ICML 2020), "standard" version, from the authors' own code
(PyPI's ``pyautoattack``, the package RobustBench depends on): the robust accuracy reviewers
and RobustBench accept. Nothing of the attacks is written again here.

    result = run_autoattack(model, x, y, epsilon=8 / 255, seed=0)
    result.accuracy        # the robust accuracy after APGD-CE, APGD-T, FAB-T and Square
    result.after_attack    # {"clean": .., "apgd-ce": .., "apgd-t": .., "fab-t": .., "square": ..}

The four attacks run one after the other, each on the points none before it has broken, exactly
as ``AutoAttack.run_standard_evaluation`` runs them (same batches, same seeds, so the same
result), but one call per attack, so that:

- each finished attack is reported (``on_attack``) as it ends, for the job's progress;
- an evaluation that was cut short resumes from the package's own state file (``state_path``,
  its ``EvaluationState``) after the last finished attack. (The package's own resume cannot be
  used: in ``run_standard_evaluation`` a restored state leaves ``y_adv`` unset, and the first
  point an attack breaks then raises ``UnboundLocalError``.)

RobustBench flags an evaluation "potentially unreliable" when AutoAttack's own checks warn
(its ``flags_doc.md``): e.g. Square, a black-box attack, lowering the accuracy below what the
white-box attacks left, or a model that looks randomised. Those warnings are kept in the result.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyautoattack import AutoAttack
from pyautoattack import checks as autoattack_checks
from pyautoattack.state import EvaluationState
from torch import nn

from workers.attacks import frozen
from workers.device import full_precision

log = logging.getLogger(__name__)

# The standard version's attacks, in the order it runs them.
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
# The package's default batch; the batches decide the attacks' random draws, so the same batch
# size gives the same result as the package called directly.
AUTOATTACK_BATCH_SIZE = 250
AUTOATTACK_LOGGER = "auto-attack"

# Called after each attack: (attack, robust accuracy after it, seconds since the start).
OnAttack = Callable[[str, float, float], None]


@dataclass
class AutoAttackResult:
    accuracy: float
    examples: int
    epsilon: float
    # Robust accuracy after each attack in turn, "clean" first: what each one took away.
    after_attack: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # AutoAttack's own checks that warned (its flags_doc.md).
    warnings: list[str] = field(default_factory=list)

    @property
    def unreliable(self) -> bool:
        """RobustBench's "potentially unreliable" flag: AutoAttack's checks warned."""
        return bool(self.warnings)

    def as_report(self) -> dict[str, Any]:
        """What the service stores of a finished evaluation: everything, the flag included."""
        return {**asdict(self), "unreliable": self.unreliable, "done": True}


def progress_poster(post: Callable[[dict[str, Any]], None]) -> OnAttack:
    """An ``on_attack`` that posts, after each attack, what the attacks so far left, in the
    shape the service stores while AutoAttack runs (``done`` false)."""
    after_attack: dict[str, float] = {}

    def on_attack(attack: str, accuracy: float, seconds: float) -> None:
        after_attack[attack] = accuracy
        post({"after_attack": dict(after_attack), "seconds": seconds, "done": False})

    return on_attack


def run_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    seed: int,
    batch_size: int = AUTOATTACK_BATCH_SIZE,
    state_path: Path | None = None,
    on_attack: OnAttack | None = None,
) -> AutoAttackResult:
    """AutoAttack "standard" (L-inf, ``epsilon``) on ``(x, y)``, in fp32, model in eval mode.

    With ``state_path``, progress is kept there (the package's ``EvaluationState``, and the
    accuracies after each attack beside it in ``<state_path>.progress.json``), and a run that
    finds them resumes after the last finished attack.
    """
    device = x.device
    attack = AutoAttack(
        model, norm="Linf", eps=epsilon, version="standard", seed=seed, device=device
    )
    state, progress = _load_state(state_path)
    result = AutoAttackResult(accuracy=1.0, examples=len(x), epsilon=epsilon)
    previous_seconds = float(progress.get("seconds", 0.0))
    started = time.perf_counter()
    with frozen(model), full_precision(), _warnings_of_autoattack() as warnings:
        if state.robust_flags is None:
            state.robust_flags = _correct(model, x, y, batch_size)  # saved by the setter
            state.clean_accuracy = state.robust_flags.float().mean().item()
        elif state.run_attacks:
            log.info("AutoAttack resumes after %s", ", ".join(sorted(state.run_attacks)))
        result.after_attack = {"clean": state.clean_accuracy, **progress.get("after_attack", {})}
        robust = state.robust_flags.to(device)
        for name in STANDARD_ATTACKS:
            if name in state.run_attacks:
                continue
            remaining = robust.nonzero().flatten()
            if len(remaining):
                attack.attacks_to_run = [name]
                with trace_function_kept():
                    _, y_adv = attack.run_standard_evaluation(
                        x[remaining], y[remaining], batch_size=batch_size
                    )
                robust[remaining] = y_adv.to(device) == y[remaining]
            state.robust_flags = robust
            state.add_run_attack(name)
            state.to_disk(force=True)
            seconds = previous_seconds + time.perf_counter() - started
            result.after_attack[name] = robust.float().mean().item()
            _save_progress(state_path, result.after_attack, seconds)
            log.info(
                "AutoAttack: robust accuracy after %s: %.2f%% (%.1f s)",
                name.upper(),
                100 * result.after_attack[name],
                seconds,
            )
            if on_attack is not None:
                on_attack(name, result.after_attack[name], seconds)
        # The package's own check of the whole run: did Square find what the others missed?
        autoattack_checks.check_square_sr(
            result.after_attack, logger=logging.getLogger(AUTOATTACK_LOGGER)
        )
    result.accuracy = robust.float().mean().item()
    result.seconds = previous_seconds + time.perf_counter() - started
    result.warnings = warnings
    return result


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Which points the model classifies correctly (the package's first pass, as it does it)."""
    with torch.no_grad():
        return torch.cat(
            [
                model(x[i : i + batch_size]).max(dim=1)[1] == y[i : i + batch_size]
                for i in range(0, len(x), batch_size)
            ]
        )


def _load_state(state_path: Path | None) -> tuple[EvaluationState, dict[str, Any]]:
    """The package's evaluation state and our progress beside it: from ``state_path`` when a
    run left them there, else new ones (saved there as they change)."""
    if state_path is not None and state_path.exists():
        state = EvaluationState.from_disk(state_path)
        # The package's own round trip loses the sets' type: it writes the attacks to run with
        # str() ("{'apgd-ce', ...}") and the attacks run as a list, and reads both back so.
        if isinstance(state._attacks_to_run, str):
            state._attacks_to_run = set(ast.literal_eval(state._attacks_to_run))
        state._run_attacks = set(state._run_attacks)
        if state.attacks_to_run != set(STANDARD_ATTACKS):
            raise ValueError(f"{state_path} holds the state of another AutoAttack version")
        progress_file = _progress_path(state_path)
        progress = json.loads(progress_file.read_text()) if progress_file.exists() else {}
        return state, progress
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    return EvaluationState(set(STANDARD_ATTACKS), path=state_path), {}


def _save_progress(state_path: Path | None, after_attack: dict[str, float], seconds: float) -> None:
    if state_path is not None:
        progress = {"after_attack": after_attack, "seconds": seconds}
        _progress_path(state_path).write_text(json.dumps(progress))


def _progress_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".progress.json")


@contextmanager
def trace_function_kept() -> Iterator[None]:
    """The thread's trace function as it was before the block. AutoAttack's check for dynamic
    defenses (``checks.check_dynamic``) sets a trace function of its own and then
    ``sys.settrace(None)``, dropping whatever traced the process before: a debugger, or the
    coverage of the test suite, which measured nothing after the first AutoAttack."""
    tracer = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(tracer)


@contextmanager
def _warnings_of_autoattack() -> Iterator[list[str]]:
    """The warnings AutoAttack's checks log while the block runs, each once."""
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if record.levelno >= logging.WARNING and message not in warnings:
                warnings.append(message)

    logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler = Collect()
    logger.addHandler(handler)
    try:
        yield warnings
    finally:
        logger.removeHandler(handler)
