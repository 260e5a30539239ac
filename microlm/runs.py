"""Run folders: what they hold, how a trained model is loaded from one, and what produced it.

A *model folder* holds everything needed to use a model, and nothing that can run code:

    config.json        {"model": GPTConfig, "data": what it was trained on, "tokenizer": ..., "provenance": ...}
    tokenizer.json     the tokenizer (tokenizer.py)
    model.safetensors  the weights

`microlm pretrain`, `microlm finetune --full` and `microlm merge` all write model folders, so each can be
the base of a later fine-tune. A LoRA run folder holds `adapter/` instead of the weights, and its
config.json names the model folder it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover (Windows)
    resource = None
from pathlib import Path

from . import __version__
from .checkpoint import CheckpointError, load_json, load_weights
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the OS does not say)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class UsageError(ValueError):
    """A command-line request that cannot be carried out as given; the message says what to change."""


# Everything microlm writes into a run folder (".tmp" names: files being written aside when a kill came).
RUN_NAMES = {"config.json", "tokenizer.json", "model.safetensors", "metrics.jsonl", "checkpoint", "checkpoint.old",
             "checkpoint.tmp", "adapter", "summary.json", "samples.txt", "loss.png", "answers.jsonl", "compare.json",
             "finetune_loss.png", "latency.png", "param_counts.png", "rank_sweep.png", "sweep"}


def holds_run(run_dir: Path) -> bool:
    """Whether run_dir holds a microlm run: its config.json is one microlm wrote (a JSON object with a model or
    a base, and the provenance every run records). Other programs' folders have files of the same names (a
    Hugging Face model has config.json, tokenizer.json, model.safetensors), so names alone are not enough;
    but a run stopped before its config.json was written, or whose config.json was cut short, holds only
    names microlm writes, and counts as a run too (so that --overwrite can replace it)."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON or not UTF-8
        names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
        return bool(names) and all(name in RUN_NAMES or ".tmp" in name for name in names)
    return (isinstance(config, dict) and isinstance(config.get("provenance"), dict)
            and ("model" in config or "base" in config))


def same_or_inside(folder: Path, other: Path) -> bool:
    """Whether `other` is `folder` or lies inside it, by what the file system says (os.path.samefile also
    sees through links and case-insensitive names, where comparing resolved paths does not)."""
    other = Path(other).resolve()
    return Path(folder).exists() and any(p.exists() and os.path.samefile(folder, p) for p in (other, *other.parents))


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, flag: str = "--run-dir") -> None:
    """Refuse to mix two runs in one folder unless told to continue (--resume) or replace (--overwrite).
    A folder that holds other files is never written into, nor deleted by --overwrite. flag: the option
    that named the folder (`merge` has --out and no --resume)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{flag} {run_dir} is a file, not a folder; choose a folder")
    holds = holds_run(run_dir)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    if resume and not holds:
        raise UsageError(f"--resume: {run_dir} holds no run to resume; drop --resume to start one")
    if run_dir.is_dir() and not holds and any(run_dir.iterdir()):
        others = sorted(p.name for p in run_dir.iterdir())
        raise UsageError(f"{run_dir} is not empty and holds no microlm run ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); microlm neither mixes its files with others nor "
                         "deletes them: choose a new or empty folder")
    if holds and not (resume or overwrite):
        resume_hint = "--resume to continue it, " if flag == "--run-dir" else ""
        raise UsageError(f"{run_dir} already holds a run; pass {resume_hint}--overwrite to replace it, or choose "
                         f"another {flag}")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, flag: str = "--run-dir") -> None:
    """check_run_dir, then empty the folder for --overwrite and make sure it exists."""
    check_run_dir(run_dir, resume, overwrite, flag)
    if overwrite and Path(run_dir).exists():
        shutil.rmtree(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)


def provenance(seed: int | None) -> dict:
    """What produced a run: seed, git commit, versions, machine and command line."""
    import numpy
    import safetensors
    import tiktoken
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"seed": seed, "git_commit": commit, "python": platform.python_version(), "microlm": __version__,
            "torch": torch.__version__, "numpy": numpy.__version__, "tiktoken": tiktoken.__version__,
            "safetensors": safetensors.__version__,
            "machine": platform.processor() or platform.machine(), "argv": sys.argv[1:]}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_run(run_dir: str | Path, device="cpu"):
    """(model, tokenizer, config dict) of a model folder, or of its last checkpoint if the run was interrupted."""
    run_dir = Path(run_dir)
    config = load_json(run_dir / "config.json", "run config (is this a microlm model folder?)")
    if "model" not in config:
        hint = f" (it is a LoRA run: its base is {config['base']})" if "base" in config else ""
        raise CheckpointError(f"{run_dir / 'config.json'}: no model config; this is not a model folder{hint}")
    try:
        model_cfg = GPTConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: bad model config: {e}") from None
    data = config.get("data", {})  # what the model was trained on; a story world is needed to score and question it
    if not isinstance(data, dict) or (data.get("kind") == "stories" and not isinstance(data.get("world"), dict)):
        raise CheckpointError(f"{run_dir / 'config.json'}: bad \"data\" entry (a story run records its world there); "
                              "the file is damaged or was not written by microlm")
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    if tokenizer.n_vocab != model_cfg.vocab_size:
        raise CheckpointError(f"{run_dir / 'tokenizer.json'}: {tokenizer.n_vocab} tokens, but the model in "
                              f"config.json has vocab_size {model_cfg.vocab_size}: the tokenizer is from another run")
    recorded = config["tokenizer"].get("sha256") if isinstance(config.get("tokenizer"), dict) else None
    if recorded and recorded != sha256_file(run_dir / "tokenizer.json"):
        raise CheckpointError(f"{run_dir / 'tokenizer.json'}: not the tokenizer this model was trained with "
                              f"(sha256 {sha256_file(run_dir / 'tokenizer.json')}, config.json records {recorded}); "
                              "put the run's own tokenizer.json back")
    model = GPT(model_cfg)
    weights = run_dir / "model.safetensors"
    if not weights.exists() and (run_dir / "checkpoint" / "model.safetensors").exists():
        weights = run_dir / "checkpoint" / "model.safetensors"
        print(f"note: {run_dir} has no final weights; using its last checkpoint", file=sys.stderr)
    load_weights(weights, model)
    return model.to(device).eval(), tokenizer, config
