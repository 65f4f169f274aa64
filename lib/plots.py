"""PNG plots for the MLflow run: the loss curve and base-vs-tuned bars."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start), same length as `values`."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss(history: list[dict], path: str | Path) -> Path:
    """Training loss per optimizer step (nats/token), with validation points where measured.

    A micro-batch of a few blocks makes the per-step loss noisy, so the raw curve is drawn faint
    and a trailing moving average on top; validation loss (the whole validation split, adapter in
    eval mode) is drawn as points, the last one labelled.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if h.get("train_loss") is not None]
    losses = [h["train_loss"] for h in history if h.get("train_loss") is not None]
    window = max(1, len(losses) // 20)
    if window > 1:
        ax.plot(steps, losses, color="#1f77b4", alpha=0.3, linewidth=0.8, label="train (per step)")
        ax.plot(
            steps,
            _moving_average(losses, window),
            color="#1f77b4",
            linewidth=2,
            label=f"train (mean of last {window} steps)",
        )
    else:
        ax.plot(steps, losses, "o-" if len(losses) < 10 else "-", color="#1f77b4", label="train")
    val = [(h["step"], h["validation_loss"]) for h in history if h.get("validation_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", color="#ff7f0e", label="validation")
        ax.annotate(
            f"{val[-1][1]:.3f}",
            val[-1],
            textcoords="offset points",
            xytext=(-6, 5),
            ha="right",
            fontsize=8,
            color="#ff7f0e",
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, also for 4-step runs
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("LoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# Panel titles that name the metric and its scale (lib/metrics.py conventions).
_TITLES = {
    "test_perplexity": "token perplexity",
    "test_bits_per_byte": "bits per byte",
    "test_bits_per_char": "bits per char",
    "test_word_perplexity": "word perplexity",
    "chrf": "chrF++ (0-100)",
    "bleu": "BLEU (0-100)",
    "rouge1": "ROUGE-1 F (0-1)",
    "rouge2": "ROUGE-2 F (0-1)",
    "rougeL": "ROUGE-L F (0-1)",
}


def plot_comparison(
    metrics: dict[str, float],
    names: list[str],
    path: str | Path,
    lower_is_better: frozenset[str] | set[str] = frozenset(),
) -> Path:
    """Side-by-side bars of `base_<name>` and `<name>` for each metric present.

    Every panel starts at 0 (all metrics here are non-negative; a cut axis would exaggerate small
    deltas) and its title says which way is better and the relative change.
    """
    plt = _pyplot()
    names = [n for n in names if n in metrics and f"base_{n}" in metrics]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(2.8 * max(1, len(names)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        base, tuned = metrics[f"base_{name}"], metrics[name]
        bars = ax.bar(["base", "tuned"], [base, tuned], color=["#999999", "#2f6fb0"])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        top = max(base, tuned)
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)  # room for the labels; an all-zero panel keeps a 0..1 axis
        change = f"{(tuned - base) / base:+.1%}" if base else f"{tuned - base:+.3g}"
        direction = "lower" if name in lower_is_better else "higher"
        ax.set_title(f"{_TITLES.get(name, name)}\n{direction} is better; tuned {change}", fontsize=9)
    fig.suptitle("base vs tuned (same test articles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
