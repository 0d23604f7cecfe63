"""Where and how a model runs: the device, bf16 autocast and channels_last on CUDA, DDP unwrap.

Everything runs on the CPU in fp32; on CUDA training runs in bf16 autocast with channels_last
tensors, the two settings that matter most for convolutions on recent GPUs. Evaluation runs
inside ``full_precision()``: validation, test PGD and AutoAttack are fp32 everywhere, as papers
and RobustBench report them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch
from torch import nn


def default_device() -> torch.device:
    """CUDA when there is a GPU, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Off inside full_precision(): a context variable, so it holds for whatever the block calls.
_mixed_precision: ContextVar[bool] = ContextVar("advorch_mixed_precision", default=True)


@contextmanager
def full_precision() -> Iterator[None]:
    """fp32 for every forward pass inside the block, on CUDA too (no autocast)."""
    token = _mixed_precision.set(False)
    try:
        yield
    finally:
        _mixed_precision.reset(token)


def autocast(device: torch.device) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16), unless inside
    ``full_precision()``; nothing on the CPU."""
    if device.type == "cuda" and _mixed_precision.get():  # GPU only
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA, where cuDNN's tensor-core convolutions want NHWC."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` moved to ``device``, its weights in the device's memory format."""
    # Module.to accepts memory_format at run time; its type stubs do not list it.
    return model.to(device, memory_format=memory_format(device))  # type: ignore[call-overload]


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``x``, computed under the device's autocast, as float32."""
    with autocast(x.device):
        return model(x).float()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model
