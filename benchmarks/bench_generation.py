"""Generation: what the KV cache saves.

Decoding from `<|endoftext|>` (as `microlm sample` starts a story), through
microlm.generate.generate twice: with the cache, each step feeds one token and attends to the stored
keys and values; with use_cache=False, each step runs the whole prefix through the model again, so
the work per step grows with the length and the total with its square. The ratio therefore grows
with the number of new tokens, which the context caps (the prompt takes one position).

The tokens are sampled at temperature 1.0, as `make pretrain` samples its stories, from a generator
seeded alike for every call, so both paths decode the same tokens. (Greedy decoding of this random
model picks the end token at every step: each step would then take the document-mask path, which a
story, with no end token before its own end, never does.) A sample can still draw the end token
(about one step in 350 here): from then on that row, and its whole batch, takes the document-mask
path, as when `make pretrain` samples 50 stories at a time and finished rows go on. Each figure
records the first step at which that happened (first_end_token_step; None: never).

At batch 1 a cached step of this small model is mostly fixed per-call overhead (a few hundred small
kernels), which no cache removes; recomputing grows with batch x length. So the longest length is also
measured at `batch_size` rows, as `make pretrain` samples its 200 stories (50 at a time), and a few
cached steps run under torch.profiler (token_profile) to count a token's operator calls and show where
its time goes, beside the time its arithmetic alone would take at the machine's matmul peak.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from bench_training import PROFILE_PARTS, op_part
from microlm.evaluate import decode
from microlm.generate import generate
from microlm.model import GPT, GPTConfig
from microlm.train import matmul_peak_flops
from timing import paired_ratio, side_by_side, target


DECODING = {"temperature": 1.0, "seed": 0}  # how the timed tokens are drawn, recorded with the results


def sampling() -> dict:
    """generate's sampling arguments: temperature 1.0 and a fresh generator with the same seed, so
    every call draws the same tokens (up to a near-tie that rounding tips, which same_tokens records)."""
    return {"temperature": DECODING["temperature"], "generator": torch.Generator().manual_seed(DECODING["seed"])}


def first_end_token_step(rows: list[list[int]], eot_id: int) -> int | None:
    """The first step at which any row drew the end token (the document mask is built from the step
    after it on), or None."""
    steps = [row.index(eot_id) for row in rows if eot_id in row]
    return min(steps) if steps else None


def bench_generation(config: GPTConfig, lengths: tuple[int, ...], repeats: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config).eval()  # random weights: the speed depends on them only through the tokens drawn
    room = config.context_length - 1  # the prompt takes one position
    rows = [_cache_vs_recompute(model, n, 1, lengths, room, repeats)
            for n in sorted({min(n, room) for n in lengths})]  # lengths the context caps to the same n run once
    # Recomputing 50 rows of 255 tokens takes 30 to 40 s a call, most of the whole benchmark's time at 7
    # repeats; half as many still leave its spread far below a ratio of about 25x.
    batched = _cache_vs_recompute(model, rows[-1]["new_tokens"], batch_size, lengths, room, max(1, repeats // 2))
    return {"batch_size": 1, "context_length": config.context_length, "decoding": DECODING,
            "lengths": rows, "batched": batched,
            "token_profile": token_profile(model, min(64, room), repeats),
            "targets": {"kv_cache_speedup_longest": target(rows[-1]["speedup"]["median"], ">=", 10.0),
                        "kv_cache_speedup_longest_batched": target(batched["speedup"]["median"], ">=", 10.0)}}


def token_profile(model: GPT, n_tokens: int, repeats: int) -> dict:
    """One cached decoding step at batch 1, taken apart: n_tokens steps (microlm.evaluate.decode, as the
    latency figures run them, on tokens sampled as above) under torch.profiler, after a warm-up. Per
    token: the operator calls made from Python (top-level aten ops), all operator calls (with the ones
    they make), and the self CPU seconds of each part (bench_training.op_part). Beside them, the forward FLOPs of a
    token's matmuls (2 per weight, lm_head included; the attention over the prefix adds at most 4 *
    n_layers * d_model * context more) and the fp32 matmul peak measured now: how long the arithmetic
    alone would take. The same decoding is also timed without the profiler (median of `repeats`): the
    operators' self time leaves out the Python that runs between them, which the timed figure holds."""
    print(f"  generation  profile of {n_tokens} cached steps, batch 1", flush=True)
    prompt = torch.full((1, 1), max(model.config.eot_id, 0))
    tokens = generate(model, prompt, n_tokens, **sampling())[0]
    timed = side_by_side({"decode": lambda: decode(model, prompt, tokens)}, repeats)["decode"]  # warm-up first
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, prompt, tokens)
    parts = dict.fromkeys(PROFILE_PARTS, 0.0)
    calls = top_calls = 0
    for e in prof.events():
        if e.name.startswith("aten::"):
            calls += 1
            top_calls += e.cpu_parent is None
        parts[op_part(e)] += e.self_cpu_time_total * 1e-6 / len(tokens)
    # every matmul weight once: the blocks' linears and lm_head (an nn.Linear, tied to the embedding or not)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"tokens": len(tokens), "first_end_token_step": first_end_token_step([tokens], model.config.eot_id),
            "seconds_per_token": parts, "timed_seconds_per_token": timed["median_s"] / len(tokens),
            "calls_per_token": calls / len(tokens),
            "python_calls_per_token": top_calls / len(tokens), "matmul_flops_per_token": 2 * weights,
            "matmul_peak_flops": matmul_peak_flops()}


def _cache_vs_recompute(model: GPT, n: int, batch_size: int, lengths, room: int, repeats: int) -> dict:
    print(f"  generation  {n} new tokens, batch {batch_size}", flush=True)
    prompt = torch.full((batch_size, 1), max(model.config.eot_id, 0))

    last = {}  # each path's tokens from its last timed call

    def run(use_cache: bool):
        last[use_cache] = generate(model, prompt, n, **sampling(), use_cache=use_cache)

    t = side_by_side({"kv_cache": lambda: run(True), "recompute": lambda: run(False)}, repeats)
    return {
        "new_tokens": n, "batch_size": batch_size, "requested": [r for r in lengths if min(r, room) == n],
        "time": t, "tokens_per_s": {k: batch_size * n / v["median_s"] for k, v in t.items()},
        "speedup": paired_ratio(t["recompute"], t["kv_cache"]),
        # Both paths compute the same logits up to rounding (tests/test_model.py); a near-tie between
        # two tokens of a random model may still tip differently, so this is recorded, not asserted.
        "same_tokens": last[True] == last[False],
        "first_end_token_step": first_end_token_step(last[True], model.config.eot_id),
    }
