"""One training loop for pretraining, LoRA and full fine-tuning.

The loop knows nothing about where batches come from: it calls `get_batch(i)` for micro-batch i
(inputs, targets with IGNORE where no loss is taken) and `evaluate(model)` for a dict of validation
metrics. Because batch i depends on i alone, a run resumed from a checkpoint at step s sees exactly
the batches an uninterrupted run would have seen; the checkpoint also keeps the random generators'
state (LoRA's dropout draws from them), so it ends with the same weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm  # the console bar; tqdm.auto would want ipywidgets in a notebook

from .checkpoint import (CheckpointError, changed_settings, check_keys, load_json, load_optimizer, load_weights,
                         read_tensors, replace_dir, save_json, save_optimizer, save_tensors, save_text, save_weights)
from .data import IGNORE


@dataclass
class TrainConfig:
    max_steps: int = 1500
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-2  # high for AdamW, and stable here thanks to QK-norm (see model.py)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # 300 warm-up steps (a fifth of the run): with 100, two of three seeds tried (on an earlier version's
    # eight-place world) stalled on a plateau where the model had not even learned to copy the story's
    # start place, and ended above 1.15x the bound
    warmup_steps: int = 300
    weight_decay: float = 0.1  # on matrices only: norms' gains and biases are not shrunk toward 0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 200
    checkpoint_every: int = 500
    seed: int = 1337
    # torch.compile the training forward and backward (eval and sampling stay eager). On a 2-core CPU it
    # paid 1.05x to 1.35x in make bench runs, after about 26 s of compiling from an empty cache (6 s when
    # inductor's on-disk cache holds an earlier process's work); needs a C++ compiler, falls back to eager
    # with a note where it fails. Off by default so tests and short runs do not pay the compile time.
    compile: bool = False

    def __post_init__(self):
        rules = {  # field: (holds, valid range for the message)
            "max_steps": (self.max_steps >= 1, ">= 1"), "batch_size": (self.batch_size >= 1, ">= 1"),
            "grad_accum": (self.grad_accum >= 1, ">= 1"), "lr": (self.lr > 0, "> 0"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "beta1": (0 <= self.beta1 < 1, "in [0, 1)"), "beta2": (0 <= self.beta2 < 1, "in [0, 1)"),
            "grad_clip": (self.grad_clip >= 0, ">= 0 (0 disables)"), "eval_every": (self.eval_every >= 1, ">= 1"),
            "checkpoint_every": (self.checkpoint_every >= 1, ">= 1"),
            "seed": (-2**63 <= self.seed < 2**63, "a 64-bit integer"),  # what torch.manual_seed takes
        }
        for name, (ok, valid) in rules.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range ({valid})")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay. Convention: step 0 is the first update and gets lr/warmup,
    so no step is wasted at lr 0; the last step (max_steps - 1) ends at lr * min_lr_ratio, unless the
    warm-up takes all but one step or more (train() says so), when the run ends before any decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE. logits: (B, T, V), targets: (B, T).
    Half-precision logits are taken in fp32; float64 stays float64 (the exactness checks need it)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def matmul_peak_flops(n: int = 1024, repeats: int = 10, device: torch.device | str = "cpu") -> float:
    """The fp32 matmul speed of `device`, measured now: best of `repeats` (n x n) @ (n x n) products.
    Its own random generator: measuring leaves the global one, and so training, untouched."""
    device = torch.device(device)
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    a @ b  # warm-up
    sync()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()  # a GPU returns before the product is done
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being finite; the message names the step and what to try."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the checkpoint at `step` was saved."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"interrupted; checkpoint saved at step {step}")


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    get_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    evaluate: Callable[[torch.nn.Module], dict],
    run_dir: str | Path,
    resume: bool = False,
    flops_per_token: float = 0.0,
    chars_per_token: float | None = None,
    progress: bool = True,
) -> dict:
    """Train `model` in place for cfg.max_steps optimizer steps; return a summary dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg)
    step, tokens_seen, train_time = 0, 0, 0.0
    if resume:
        step, tokens_seen, train_time = load_checkpoint(run_dir, model, opt, cfg)
    saved_step = step if resume else None  # the step of the last checkpoint on disk, for messages
    _trim_metrics(run_dir / "metrics.jsonl", step)
    peak = matmul_peak_flops(device=device)
    if cfg.warmup_steps >= cfg.max_steps - 1:
        print(f"note: --warmup-steps {cfg.warmup_steps} leaves none of the --max-steps {cfg.max_steps} for the "
              f"decay: the learning rate ends at {lr_at(cfg.max_steps - 1, cfg):.3g} (--lr {cfg.lr:g})")
    last_eval: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    model.train()
    # The compiled module shares the model's parameters: evaluation, checkpoints and the returned model
    # use `model` itself. The first step's time includes the compiling.
    forward = torch.compile(model) if cfg.compile else model
    step_rng = None
    with _stop_requests() as stop:
        try:
            while step < cfg.max_steps:
                # The generators as this step starts: an interrupt inside the step saves these, so that
                # the resumed run draws the step's dropout masks again, not the ones after them.
                step_rng = rng_state(device)
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss_sum, n_tokens = 0.0, 0
                batches = [get_batch(step * cfg.grad_accum + micro) for micro in range(cfg.grad_accum)]
                # Each micro-batch's mean loss counts by its share of the step's targets, so the step follows
                # the mean over all of them, as one batch of them all would. (Fine-tuning trains on answers
                # only, so micro-batches can hold different numbers of targets; pretraining windows cannot.)
                counts = [int((y != IGNORE).sum()) for _, y in batches]
                total, ran = sum(counts), 0  # ran: micro-batches run so far in this step
                if total == 0:
                    raise ValueError(f"step {step + 1}'s batch holds no target to learn from (every position is "
                                     "masked); the training data has examples with nothing to predict")
                for (x, y), count in zip(batches, counts):
                    if count == 0:  # no target: its mean loss is undefined, and it adds nothing
                        continue
                    share = count / total  # exactly 1.0 for a single batch
                    x, y = x.to(device), y.to(device)
                    try:
                        loss = masked_loss(forward(x), y)
                        (loss * share).backward()
                    except Exception as e:  # compiling happens at the first call: fall back to eager there
                        if forward is model or ran:
                            raise
                        bar.write(f"note: torch.compile failed ({type(e).__name__}: {str(e).strip()[:200]}); "
                                  "training without it")
                        forward = model
                        opt.zero_grad(set_to_none=True)
                        loss = masked_loss(model(x), y)
                        (loss * share).backward()
                    loss_sum += loss.item() * share
                    n_tokens += x.numel()  # positions computed, padding included: what the step cost
                    ran += 1
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.grad_clip or math.inf).item()
                # Checked before opt.step(): a non-finite gradient would put NaN into the weights, and the
                # next checkpoint would save them.
                if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                    raise TrainingDiverged(diverged_message(loss_sum, grad_norm, step, saved_step, run_dir, cfg))
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                step_rng = None  # the step is done: the generators' state now is the next step's
                tokens_seen += n_tokens
                train_time += time.perf_counter() - t0
                tok_s = tokens_seen / train_time if train_time else 0.0  # training time only: no evaluation
                record = {"step": step, "tokens": tokens_seen, "lr": lr, "train_loss": loss_sum, "grad_norm": grad_norm,
                          "tokens_per_s": tok_s, "mfu": flops_per_token * tok_s / peak}
                if chars_per_token:
                    record["train_bpc"] = loss_sum / math.log(2) / chars_per_token
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    last_eval = evaluate(model)
                    model.train()
                    record.update(last_eval)
                _append_jsonl(run_dir / "metrics.jsonl", record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tok_s:,.0f}",
                                **({"val_bpc": f"{last_eval['val_bpc']:.3f}"} if "val_bpc" in last_eval else {}))
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    save_checkpoint(run_dir, model, opt, cfg, step, tokens_seen, train_time)
                    saved_step = step
                if stop:  # a Ctrl-C or SIGTERM came during this step: act on it now, between steps
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            save_checkpoint(run_dir, model, opt, cfg, step, tokens_seen, train_time, step_rng)
            raise TrainingInterrupted(step) from None
    bar.close()
    if not last_eval:  # resumed from a checkpoint at max_steps: nothing left to train, still report
        last_eval = evaluate(model)
    tok_s = tokens_seen / train_time if train_time else 0.0
    # Measured again after training, keeping the faster: another process busy at one of the two moments
    # would otherwise make the peak look low and the utilisation high (it read 95% once).
    peak = max(peak, matmul_peak_flops(device=device))
    return {"steps": step, "tokens_seen": tokens_seen, "train_seconds": train_time, "tokens_per_s": tok_s,
            "flops_per_token": flops_per_token, "matmul_peak_flops": peak,
            "mfu": flops_per_token * tok_s / peak, **last_eval}


def diverged_message(loss: float, grad_norm: float, step: int, saved_step: int | None, run_dir: Path,
                     cfg: TrainConfig) -> str:
    """What went wrong at 0-based `step`, named as metrics.jsonl and the progress bar count (step + 1)."""
    what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
    kept = (f"the last checkpoint (step {saved_step}) is kept in {run_dir / 'checkpoint'}"
            if saved_step is not None else "no checkpoint had been saved yet")
    return (f"{what} at step {step + 1} of {cfg.max_steps}; {kept}. Try a lower --lr (now {cfg.lr}), a longer "
            f"--warmup-steps (now {cfg.warmup_steps}) or gradient clipping (--grad-clip, now {cfg.grad_clip}), and "
            "start again with --overwrite")


@contextlib.contextmanager
def _stop_requests():
    """While training, Ctrl-C and SIGTERM are noted and acted on between steps: an interrupt inside
    opt.step() would otherwise save half-updated weights under the previous step number, and the
    resumed run would not match an uninterrupted one."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield requested
        return
    previous = {s: signal.signal(s, lambda signum, frame: requested.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, model, opt, cfg: TrainConfig, step: int, tokens: int, seconds: float,
                    rng: dict[str, torch.Tensor] | None = None):
    """run_dir/checkpoint/{model,optimizer,rng_state}.safetensors + trainer_state.json, swapped in as one
    folder. rng: the generators' state to save (default: as they are now)."""
    tmp = run_dir / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_weights(tmp / "model.safetensors", model)
    groups = save_optimizer(tmp / "optimizer.safetensors", opt)
    save_tensors(tmp / "rng_state.safetensors", rng or rng_state(next(model.parameters()).device))
    save_json(tmp / "trainer_state.json", {"step": step, "tokens_seen": tokens, "train_seconds": seconds,
                                           "train_config": asdict(cfg), "optimizer": groups})
    replace_dir(tmp, run_dir / "checkpoint")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global random generators a step draws from (LoRA's dropout): CPU's, and the model's device's.
    Batches come from (seed, step) alone (data.window_batch), so they need no saving."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def load_checkpoint(run_dir: Path, model, opt, cfg: TrainConfig) -> tuple[int, int, float]:
    ckpt = run_dir / "checkpoint"
    if not ckpt.is_dir() and (run_dir / "checkpoint.old").is_dir():
        ckpt = run_dir / "checkpoint.old"  # a crash between the two renames of replace_dir
    if not ckpt.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from (the run stopped before its first one); "
                              "start it again with --overwrite instead of --resume")
    state = load_json(ckpt / "trainer_state.json", "trainer state")
    check_keys(state, ckpt / "trainer_state.json",
               ("step", "tokens_seen", "train_seconds", "train_config", "optimizer"))
    if not (all(type(state[k]) is int and state[k] >= 0 for k in ("step", "tokens_seen"))
            and type(state["train_seconds"]) in (int, float) and state["train_seconds"] >= 0
            and isinstance(state["train_config"], dict)):
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: step and tokens_seen must be integers >= 0, "
                              "train_seconds a number >= 0 and train_config an object; the file is damaged")
    if changed := changed_settings(state["train_config"], asdict(cfg)):
        raise CheckpointError(f"{ckpt}: the checkpoint was trained with other settings: {changed}; resume with "
                              "the same settings")
    load_weights(ckpt / "model.safetensors", model)
    load_optimizer(ckpt / "optimizer.safetensors", opt, state["optimizer"])
    if (ckpt / "rng_state.safetensors").exists():  # checkpoints written before it was saved have none
        rng = read_tensors(ckpt / "rng_state.safetensors", "random generator state")
        if "cpu" not in rng:
            raise CheckpointError(f"{ckpt / 'rng_state.safetensors'}: no 'cpu' generator state; the file is damaged")
        try:
            set_rng_state(rng, next(model.parameters()).device)
        except (RuntimeError, ValueError, TypeError) as e:  # a state of the wrong size or type
            raise CheckpointError(f"{ckpt / 'rng_state.safetensors'}: not a random generator state torch can take "
                                  f"({str(e).strip()[:120]}); the file is damaged") from None
    return state["step"], state["tokens_seen"], state["train_seconds"]


def _append_jsonl(path: Path, record: dict) -> None:
    # One line per write, flushed: a crash loses at most the line being written, which _trim_metrics drops.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step` (those after the checkpoint are about to be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    save_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> list[dict]:
    """The records of metrics.jsonl. A last line without its newline is one a killed process was
    writing: it is dropped. Any other line that is not JSON is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: metrics file not found; is this a finished run folder?")
    # errors="replace": a binary file fails below, naming its line, rather than here
    *lines, last = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    if last and not last.startswith("{"):  # "" after the final newline; "{..." is a record cut off by a kill
        lines.append(last)
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}, line {n}: not a JSON record ({e.msg}); the file is damaged") from None
    return records
