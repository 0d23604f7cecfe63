"""The CLI's plots: the trade-off of ``advorch tradeoff --plot`` (clean vs robust accuracy of
every configuration, repeats with their standard deviation as error bars, coloured by TRADES
beta when the trials vary it, the Pareto front drawn) and the robustness curve of
``advorch curve --plot`` (accuracy against epsilon)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def plot_tradeoff(tradeoff: dict[str, Any], path: Path, *, title: str) -> Path:
    """Write the scatter to ``path`` (PNG); ``tradeoff`` as the tradeoff route returns it."""
    points, front = tradeoff["points"], tradeoff["front"]
    axis = tradeoff["robust_axis"]
    # A bare Figure, not pyplot: no global state and no display backend, just a file.
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    ax = fig.subplots()
    clean = [100 * p["clean_acc"] for p in points]
    robust = [100 * p["robust_acc"] for p in points]
    betas = [p["config"].get("training.beta") for p in points]
    ax.errorbar(
        clean,
        robust,
        xerr=[100 * (p["clean_acc_std"] or 0) for p in points],
        yerr=[100 * (p["robust_acc_std"] or 0) for p in points],
        fmt="none",
        ecolor="grey",
        zorder=1,
    )
    if points and all(beta is not None for beta in betas):
        scatter = ax.scatter(clean, robust, c=betas, cmap="viridis", s=60, zorder=3)
        fig.colorbar(scatter, ax=ax, label="TRADES beta")
    else:
        ax.scatter(clean, robust, s=60, zorder=3)
    for p, x, y in zip(points, clean, robust, strict=True):
        label = p["trials"][0] if len(p["trials"]) == 1 else f"{len(p['trials'])} repeats"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.plot(
        [100 * p["clean_acc"] for p in front],
        [100 * p["robust_acc"] for p in front],
        color="tab:red",
        linewidth=1.5,
        label="Pareto front",
        zorder=2,
    )
    robust_label = f"robust accuracy (%), {axis['attack']} at eps {axis['epsilon']:.4f}"
    ax.set(xlabel="clean accuracy (%)", ylabel=robust_label, title=title)
    ax.margins(x=0.15, y=0.1)  # room for the trial labels
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_curve(points: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Write the robustness curve to ``path`` (PNG); ``points`` as the curve route returns
    them: accuracy against epsilon, clean, PGD and AutoAttack where it ran."""
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    ax = fig.subplots()
    epsilons = [p["epsilon"] for p in points]
    for name, label, style in [
        ("clean_acc", "clean", ":"),
        ("robust_acc", "PGD", "-o"),
        ("autoattack_acc", "AutoAttack", "-s"),
    ]:
        shown = [
            (eps, 100 * p[name])
            for eps, p in zip(epsilons, points, strict=True)
            if p[name] is not None
        ]
        if shown:
            ax.plot(*zip(*shown, strict=True), style, label=label)
    ax.set(xlabel="epsilon (L-inf, pixels in [0, 1])", ylabel="accuracy (%)", title=title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
