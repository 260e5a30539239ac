"""Every figure microlm draws. Each function takes plain data and writes one PNG atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed; the PNG is the product
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_pretrain_loss(metrics: list[dict], path: str | Path, bound_bpc: float | None = None) -> None:
    """Train and validation bits per character against tokens seen, with the corpus's entropy bound."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
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
