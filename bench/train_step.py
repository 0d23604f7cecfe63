"""Time ``adversarial_train_step`` against the textbook PGD-AT step, alternating the two.

The reference is the loop as papers and tutorials write it (e.g. Rice et al.'s
train_cifar.py), in fp32: the model stays in train mode during the attack and every attack
step calls ``loss.backward()``, computing weight gradients nobody uses. advorch's step attacks
with BatchNorm in eval mode and asks autograd for the input gradient only, and on CUDA runs in
bf16 autocast with channels_last tensors. Both run on the same model, batch and device, in
turn, so a slower or busier machine slows both alike.

    python bench/train_step.py                   # PGD-10, preact_resnet18, 32x32, CPU, fp32
    python bench/train_step.py --threads 1       # steadier on a CPU shared with other work
    python bench/train_step.py --device cuda --batch-size 512 --iterations 20  # bf16, NHWC
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workers.device import memory_format, place_model
from workers.models import build_model
from workers.training import adversarial_train_step


def reference_pgd_at_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """The textbook PGD-AT step, in fp32: train-mode attack, ``loss.backward()`` at every step."""
    model.train()
    delta = torch.empty_like(x).uniform_(-epsilon, epsilon)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        assert delta.grad is not None
        delta = (delta.detach() + step_size * delta.grad.sign()).clamp(-epsilon, epsilon)
        delta = (x + delta).clamp(0, 1) - x
    loss = F.cross_entropy(model(x + delta), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds that ``run`` takes, including the device work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name as lscpu shows it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="preact_resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps per training step")
    parser.add_argument("--iterations", type=int, default=4, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = place_model(build_model(args.arch, num_classes=10, in_channels=3), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(10, (args.batch_size,), device=device)
    attack = {"epsilon": 8 / 255, "step_size": 2 / 255, "steps": args.steps}

    # The textbook step runs in fp32 on NCHW tensors; advorch's step in its device's settings
    # (on the CPU the same; on CUDA bf16 autocast and channels_last). The model is converted
    # between the two formats outside the timed region.
    fast_format = memory_format(device)
    x_fast = x.contiguous(memory_format=fast_format)
    variants: dict[str, tuple[torch.memory_format, Callable[[], object]]] = {
        "reference": (
            torch.contiguous_format,
            lambda: reference_pgd_at_step(model, optimizer, x, y, **attack),
        ),
        "advorch": (
            fast_format,
            lambda: adversarial_train_step(model, optimizer, x_fast, y, method="pgd_at", **attack),
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for iteration in range(args.warmup + args.iterations):
        for name, (fmt, run) in variants.items():
            model.to(memory_format=fmt)  # type: ignore[call-overload]
            elapsed = timed(run, device)
            if iteration >= args.warmup:
                seconds[name].append(elapsed)

    advorch_precision = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"
    print(
        f"PGD-{args.steps} train step, {args.arch}, batch {args.batch_size} of "
        f"{args.image_size}x{args.image_size}, {device.type} ({machine_name(device)}, "
        f"{torch.get_num_threads()} threads); reference fp32, advorch {advorch_precision}; "
        f"best of {args.iterations} alternating steps each"
    )
    # The fastest step of each: on a shared machine the others only add other processes' time.
    images_per_second = {name: args.batch_size / min(times) for name, times in seconds.items()}
    for name, rate in images_per_second.items():
        steps = " ".join(f"{t:.2f}" for t in seconds[name])
        print(f"  {name:>9}: {rate:8.1f} images/s   (seconds per step: {steps})")
    ratio = images_per_second["advorch"] / images_per_second["reference"]
    median_ratio = statistics.median(seconds["reference"]) / statistics.median(seconds["advorch"])
    print(f"  ratio advorch / reference: {ratio:.2f}x (of medians: {median_ratio:.2f}x)")


if __name__ == "__main__":
    main()
