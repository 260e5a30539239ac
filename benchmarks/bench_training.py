"""Training throughput: microlm's GPT against a plain GPT-2-style stack of the same size, and torch.compile.

A step is what `microlm pretrain` does per batch: forward, cross-entropy, backward, AdamW step
(microlm.compare.step_cost, the models taking turns). The contenders, at each size on the same batch:

  ours           the GPT as `make pretrain` trains it: document mask on (eot_id set), QK-norm, RoPE, SwiGLU
  ours_causal    the same with eot_id = -1: plain causal attention, as the baseline has; the difference
                 between the two is what the document mask costs
  baseline       benchmarks/baseline.py
  ours_compiled  torch.compile(ours), at the default size only (not with --quick or --no-compile)

At the default size a few more steps of ours and of the baseline run under torch.profiler, to show where
a step's time goes (step_profile): matmuls, attention's kernels, the optimizer and everything else, which
is mostly element-wise work (norms, RoPE, activations, the loss, copies).

Model FLOP utilisation (MFU) = flops_per_token * tokens/s / the fp32 matmul peak measured in this
process (microlm.train.matmul_peak_flops), the same ruler `make pretrain` reports with. The step here
skips what train() adds around it (gradient clipping, loss.item(), logging), so it reads a little
above the tokens/s of a real run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from baseline import BaselineGPT
from microlm.compare import step_cost, training_step
from microlm.model import GPT, GPTConfig
from microlm.train import TrainConfig, make_optimizer, masked_loss, matmul_peak_flops
from timing import paired_ratio, target


def random_batch(vocab_size: int, batch_size: int, context: int, seed: int = 0):
    """(inputs, targets), each (batch, context), of random ids: the speed does not depend on the text."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab_size, (batch_size, context + 1), generator=g)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def compile_model(model: torch.nn.Module, batch, cache_dir: str) -> tuple[torch.nn.Module | None, dict]:
    """torch.compile(model) and one forward and backward, which is when the compiling happens. On CPU it
    needs a C++ compiler and seconds to minutes of CPU time; any failure is reported, never raised.
    Compiled cold, as a user's first `microlm pretrain --compile true` is: inductor keeps what it built
    on disk (by default under the system's temp folder) and reuses it in later processes, which made an
    earlier version of this benchmark report 6 s where a first compile takes about 26 s. So the compile
    gets an empty cache folder of its own (cache_dir, which must outlive the compiled model's use), and
    inductor's caches are off while it runs."""
    import torch._inductor.config as inductor_config
    x, y = batch
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    t = time.perf_counter()
    try:
        with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*dynamo_pgo force disabled")  # what was asked for
            compiled = torch.compile(model)
            masked_loss(compiled(x), y).backward()
    except Exception as e:  # no compiler, an unsupported op, ...: the benchmark goes on without it
        return None, {"ok": False, "error": _first_line(e)}
    finally:
        if before is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    model.zero_grad(set_to_none=True)
    return compiled, {"ok": True, "compile_s": time.perf_counter() - t, "cache": "cold"}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
PROFILE_PARTS = ("matmul", "attention", "optimizer", "other")


def step_profile(models: dict, batch, train_cfg: TrainConfig, rounds: int) -> dict:
    """Self CPU time of one training step (as step_cost runs it) by kind of op, in seconds, the mean of
    `rounds` profiled steps per model, the models taking turns after a warm-up step each. Every op's
    own time (without the ops it calls) goes to one part: `matmul` (MATMUL_OPS), `attention` (the
    scaled_dot_product kernels, forward and backward, and their autograd nodes), `optimizer` (anything
    inside AdamW's step or zero_grad) or `other` (element-wise ops, reductions, copies, views and
    allocations, autograd's own bookkeeping). The profiler adds a few microseconds to every op, so parts made of many
    small ops (`other`) read high: compare the models part by part, not with the step_cost timings."""
    opts = {name: make_optimizer(m, train_cfg) for name, m in models.items()}
    parts = {name: dict.fromkeys(PROFILE_PARTS, 0.0) for name in models}
    for name, m in models.items():
        training_step(m, opts[name], *batch)  # warm-up: AdamW creates its state on the first step
    for _ in range(rounds):
        for name, m in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                training_step(m, opts[name], *batch)
            for e in prof.events():
                parts[name][op_part(e)] += e.self_cpu_time_total * 1e-6 / rounds
    return parts


def op_part(event) -> str:
    """The part of a step a profiled op's own time belongs to (see step_profile)."""
    if event.name in MATMUL_OPS:
        return "matmul"
    if "scaleddotproduct" in event.name.lower().replace("_", ""):  # the kernels and their autograd nodes
        return "attention"
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    return "other"


def bench_size(name: str, config: GPTConfig, train_cfg: TrainConfig, repeats: int, try_compile: bool,
               profile_rounds: int = 0) -> dict:
    torch.manual_seed(0)
    ours = GPT(config)
    models = {"ours": ours, "ours_causal": GPT(dataclasses.replace(config, eot_id=-1)), "baseline": BaselineGPT(config)}
    batch = random_batch(config.vocab_size, train_cfg.batch_size, config.context_length)
    compiled = None
    with tempfile.TemporaryDirectory(prefix="microlm-bench-inductor-") as cache:  # what compiling builds
        if try_compile:
            # A copy: each contender must own its weights, or two optimizers would update the same tensors.
            model, compiled = compile_model(copy.deepcopy(ours), batch, cache)
            if model is not None:
                models["ours_compiled"] = model
        try:
            steps = step_cost(models, batch, train_cfg, repeats)
        except Exception as e:  # a compiled graph can also fail later, e.g. on a recompile
            if "ours_compiled" not in models:
                raise
            compiled = {"ok": False, "error": _first_line(e)}
            del models["ours_compiled"]
            steps = step_cost(models, batch, train_cfg, repeats)

    tokens = train_cfg.batch_size * config.context_length
    median = {k: v["median_s"] for k, v in steps.items()}
    row = {
        "name": name,
        "config": {k: getattr(config, k) for k in ("d_model", "n_layers", "n_heads", "context_length", "vocab_size",
                                                   "d_ff", "eot_id")} | {"batch_size": train_cfg.batch_size},
        "tokens_per_step": tokens,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items() if k != "ours_compiled"},
        "flops_per_token": {"ours": ours.flops_per_token(), "baseline": models["baseline"].flops_per_token()},
        "step": steps,
        "tokens_per_s": {k: tokens / s for k, s in median.items()},
        # Ratios round by round (paired_ratio). Higher is better for ours: baseline time / our time = our
        # tokens/s / baseline tokens/s.
        "ratio_ours_baseline": paired_ratio(steps["baseline"], steps["ours"]),
        "ratio_ours_causal_baseline": paired_ratio(steps["baseline"], steps["ours_causal"]),
        "document_mask_cost": paired_ratio(steps["ours"], steps["ours_causal"]),
    }
    if profile_rounds:
        row["profile"] = step_profile({k: models[k] for k in ("ours", "baseline")}, batch, train_cfg, profile_rounds)
    if compiled is not None:
        if compiled["ok"]:
            # the time a step saves: the median of the rounds' differences, as the speedup is the rounds' ratios
            eager, fast = steps["ours"]["samples_s"], steps["ours_compiled"]["samples_s"]
            saved = statistics.median(a - b for a, b in zip(eager, fast))
            # Compiling pays when the time it saves over a whole run exceeds the time it takes.
            compiled["speedup"] = paired_ratio(steps["ours"], steps["ours_compiled"])
            compiled["break_even_steps"] = compiled["compile_s"] / saved if saved > 0 else None
            compiled["run_steps"] = TrainConfig().max_steps
            compiled["pays"] = saved > 0 and compiled["compile_s"] < saved * compiled["run_steps"]
        row["compile"] = compiled
    return row


def bench_training(base: GPTConfig, sizes: dict[str, dict], batch_size: int, repeats: int,
                   compile_size: str | None) -> dict:
    """Each size is `base` with some fields changed ({} is the default config). torch.compile is tried at
    `compile_size` only (None: nowhere), since on CPU it costs minutes per model."""
    train_cfg = TrainConfig(batch_size=batch_size)
    peaks = [matmul_peak_flops()]
    rows = []
    for name, changes in sizes.items():
        # d_ff=0 lets each size pick its own SwiGLU width (the base config already holds the default's).
        config = dataclasses.replace(base, d_ff=0, **changes) if changes else base
        print(f"  training  {name}: d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads, "
              f"context {config.context_length}, batch {batch_size}", flush=True)
        rows.append(bench_size(name, config, train_cfg, repeats, try_compile=name == compile_size,
                               profile_rounds=3 if name == "default" else 0))
    peaks.append(matmul_peak_flops())
    peak = max(peaks)  # the machine's best: a peak measured during a slow moment would flatter the MFU
    for row in rows:
        row["mfu"] = {k: row["flops_per_token"][k] * row["tokens_per_s"][k] / peak for k in ("ours", "baseline")}
    out = {"matmul_peak_flops": peak, "matmul_peak_flops_samples": peaks, "sizes": rows, "targets": {}}
    default = next((r for r in rows if r["name"] == "default"), None)
    if default:
        out["targets"] = {"mfu_default": target(default["mfu"]["ours"], ">=", 0.55, shown=">= 55%"),
                          "ours_vs_baseline_default": target(default["ratio_ours_baseline"]["median"], ">=", 1.0)}
    if compile_size is None:
        out["compile"] = {"ok": None, "skipped": "not tried (--quick or --no-compile)"}
    else:
        out["compile"] = next((r["compile"] for r in rows if "compile" in r), {"ok": None, "skipped": "no such size"})
    return out
