"""The trade-off plot of ``advorch tradeoff --plot``: clean vs robust accuracy of every trial,
coloured by TRADES beta when the trials vary it, with the Pareto front drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def plot_tradeoff(
    points: list[dict[str, Any]], front: list[dict[str, Any]], path: Path, *, title: str
) -> Path:
    """Write the scatter to ``path`` (PNG); ``points`` and ``front`` as the tradeoff route
    returns them (each with key, config, clean_acc, robust_acc)."""
    # A bare Figure, not pyplot: no global state and no display backend, just a file.
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    ax = fig.subplots()
    clean = [100 * p["clean_acc"] for p in points]
    robust = [100 * p["robust_acc"] for p in points]
    betas = [p["config"].get("training.beta") for p in points]
    if points and all(beta is not None for beta in betas):
        scatter = ax.scatter(clean, robust, c=betas, cmap="viridis", s=60, zorder=3)
        fig.colorbar(scatter, ax=ax, label="TRADES beta")
    else:
        ax.scatter(clean, robust, s=60, zorder=3)
    for p, x, y in zip(points, clean, robust, strict=True):
        ax.annotate(p["key"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.plot(
        [100 * p["clean_acc"] for p in front],
        [100 * p["robust_acc"] for p in front],
        color="tab:red",
        linewidth=1.5,
        label="Pareto front",
        zorder=2,
    )
    ax.set(xlabel="clean accuracy (%)", ylabel="robust accuracy (%)", title=title)
    ax.margins(x=0.15, y=0.1)  # room for the trial labels
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
