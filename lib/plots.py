"""PNG plots for the MLflow run: the loss curve and base-vs-tuned bars."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: list[dict], path: str | Path) -> Path:
    """Training loss per optimizer step (nats/token), with validation points where measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], label="train")
    val = [(h["step"], h["validation_loss"]) for h in history if h.get("validation_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("LoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_comparison(metrics: dict[str, float], names: list[str], path: str | Path) -> Path:
    """Side-by-side bars of `base_<name>` and `<name>` for each metric present."""
    plt = _pyplot()
    names = [n for n in names if n in metrics and f"base_{n}" in metrics]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(2.6 * max(1, len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [metrics[f"base_{name}"], metrics[name]]
        bars = ax.bar(["base", "tuned"], values, color=["#999999", "#2f6fb0"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle("base vs tuned (same test articles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
