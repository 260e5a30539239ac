"""Every figure microlm draws. Each function takes plain data and writes one PNG atomically."""

from __future__ import annotations

from pathlib import Path

# A bare Figure, not pyplot: no global backend is switched (a notebook importing microlm keeps its
# inline plots), no screen is needed, and nothing is left open in pyplot's figure registry.
from matplotlib.figure import Figure

from .checkpoint import atomic_path


def _figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure and its axes, like plt.subplots."""
    fig = Figure(figsize=kwargs.pop("figsize"))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_pretrain_loss(metrics: list[dict], path: str | Path, bound_bpc: float | None = None) -> None:
    """Train and validation bits per character against tokens seen, with the corpus's entropy bound."""
    fig, ax = _figure(figsize=(7, 4.2))
    train = [m for m in metrics if "train_bpc" in m]
    if train:
        ax.plot([m["tokens"] for m in train], [m["train_bpc"] for m in train], lw=0.8, alpha=0.6, label="train")
    val = [m for m in metrics if "val_bpc" in m]
    ax.plot([m["tokens"] for m in val], [m["val_bpc"] for m in val], "o-", ms=3, label="validation")
    if bound_bpc:
        ax.axhline(bound_bpc, color="k", ls="--", lw=1, label=f"exact entropy bound ({bound_bpc:.3f})")
        top = max([m["val_bpc"] for m in val] + [bound_bpc * 2])
        ax.set_ylim(bound_bpc * 0.8, min(top, bound_bpc * 4))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("bits per character")
    ax.set_title("Pretraining: loss against the best any model can do")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_finetune_loss(runs: dict[str, list[dict]], path: str | Path) -> None:
    """Training and held-out loss on the answer tokens against steps, one colour per run."""
    fig, ax = _figure(figsize=(7, 4.2))
    for i, (name, metrics) in enumerate(runs.items()):
        colour = f"C{i}"
        ax.plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics], color=colour, lw=0.7, alpha=0.45,
                label=f"{name}: train")
        val = [m for m in metrics if "val_loss" in m]
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", color=colour, ms=3,
                label=f"{name}: held out")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (same batches for every run)")
    ax.set_ylabel("loss on answer tokens (nats/token)")
    ax.set_title("Fine-tuning: LoRA against full fine-tuning")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)


def plot_param_counts(rows: list[dict], shapes: list[dict], path: str | Path) -> None:
    """Left: trainable parameters of full fine-tuning and of LoRA over ranks and target sets (this model,
    counted). Right: the trainable fraction of LoRA r=8 on q,k,v,output for this model and for larger
    shapes (from the formula r * (d_in + d_out) per adapted matrix)."""
    fig, (ax, bx) = _figure(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    total = rows[0]["total"]
    ax.axhline(total, color="k", lw=1.2, label=f"full fine-tuning: all {total:,} parameters")
    for targets in dict.fromkeys(r["targets"] for r in rows):
        pts = [r for r in rows if r["targets"] == targets]
        ax.plot([p["r"] for p in pts], [p["trainable"] for p in pts], "o-", ms=4, label=f"LoRA on {targets}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_title("What is trained (this model)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    names = [s["name"] for s in shapes]
    fracs = [100 * s["trainable"] / s["total"] for s in shapes]
    bars = bx.bar(names, fracs, color=["C0", "C1", "C2"][: len(shapes)])
    for bar, s, f in zip(bars, shapes, fracs):
        bx.annotate(f"{f:.2f}%\n{s['trainable'] / 1e6:.2g}M of {s['total'] / 1e6:,.4g}M", (bar.get_x() + bar.get_width() / 2, f),
                    ha="center", va="bottom", fontsize=8)
    bx.set_ylabel("trainable % (LoRA r=8 on q, k, v, output)")
    bx.set_title("The same LoRA at other sizes")
    bx.set_ylim(0, max(fracs) * 1.35)
    _save(fig, path)


def plot_rank_sweep(points: list[dict], full_accuracy: float | None, path: str | Path) -> None:
    """Held-out exact match against LoRA rank, with trainable parameters on a second axis."""
    fig, ax = _figure(figsize=(7, 4.2))
    rs = [p["r"] for p in points]
    ax.plot(rs, [100 * p["accuracy"] for p in points], "o-", color="C0", label="LoRA exact match")
    if full_accuracy is not None:
        ax.axhline(100 * full_accuracy, color="C3", ls="--", lw=1, label=f"full fine-tune ({full_accuracy:.1%})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.set_xlabel("LoRA rank r (q, k, v, output)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 105)
    bx = ax.twinx()
    bx.plot(rs, [p["trainable"] for p in points], "s:", color="C2", ms=4, label="trainable parameters")
    bx.set_yscale("log")
    bx.set_ylabel("trainable parameters", color="C2")
    lines = ax.get_legend_handles_labels(), bx.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], loc="lower right")
    ax.set_title("Rank sweep: the same budget at every rank")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_latency(latency: dict[str, dict], path: str | Path) -> None:
    """Per-token generation latency (median, with min-max whiskers) of base, merged and unmerged."""
    fig, ax = _figure(figsize=(7, 3.8))
    names = list(latency)
    med = [1e3 * latency[n]["median_s"] for n in names]
    err = [[m - 1e3 * latency[n]["min_s"] for n, m in zip(names, med)],
           [1e3 * latency[n]["max_s"] - m for n, m in zip(names, med)]]
    ax.bar([n.replace("_", " ") for n in names], med, yerr=err, capsize=4, color=["C7", "C0", "C1", "C2"][: len(names)])
    for i, m in enumerate(med):
        ax.annotate(f"{m:.2f} ms\n({m / med[0]:.2f}x)", (i, m), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 4), textcoords="offset points")
    ax.set_ylabel("ms per generated token (batch 1, KV cache)")
    ax.set_ylim(0, max(med) * 1.4)
    ax.set_title("Merging removes the adapter's cost")
    _save(fig, path)
