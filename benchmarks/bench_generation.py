"""Generation: what the KV cache saves.

Greedy decoding from `<|endoftext|>` (as `microlm sample` starts a story), through
microlm.generate.generate twice: with the cache, each step feeds one token and attends to the stored
keys and values; with use_cache=False, each step runs the whole prefix through the model again, so
the work per step grows with the length and the total with its square. The ratio therefore grows
with the number of new tokens, which the context caps (the prompt takes one position).

At batch 1 a cached step of this small model is mostly fixed per-call overhead (a few hundred small
kernels), which no cache removes; recomputing grows with batch x length. So the longest length is also
measured at `batch_size` rows, as `make pretrain` samples its 200 stories (50 at a time).
"""

from __future__ import annotations

import torch

from microlm.generate import generate
from microlm.model import GPT, GPTConfig
from timing import paired_ratio, side_by_side, target


def bench_generation(config: GPTConfig, lengths: tuple[int, ...], repeats: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config).eval()  # random weights: the speed does not depend on them
    room = config.context_length - 1  # the prompt takes one position
    rows = [_cache_vs_recompute(model, n, 1, lengths, room, repeats)
            for n in sorted({min(n, room) for n in lengths})]  # lengths the context caps to the same n run once
    # Recomputing 50 rows of 255 tokens takes about 40 s a call, most of the whole benchmark's time at 7
    # repeats; half as many still leave its spread far below a ratio of about 25x.
    batched = _cache_vs_recompute(model, rows[-1]["new_tokens"], batch_size, lengths, room, max(1, repeats // 2))
    return {"batch_size": 1, "context_length": config.context_length, "lengths": rows, "batched": batched,
            "targets": {"kv_cache_speedup_longest": target(rows[-1]["speedup"]["median"], ">=", 10.0),
                        "kv_cache_speedup_longest_batched": target(batched["speedup"]["median"], ">=", 10.0)}}


def _cache_vs_recompute(model: GPT, n: int, batch_size: int, lengths, room: int, repeats: int) -> dict:
    print(f"  generation  {n} new tokens, batch {batch_size}", flush=True)
    prompt = torch.full((batch_size, 1), max(model.config.eot_id, 0))

    last = {}  # each path's tokens from its last timed call

    def run(use_cache: bool):
        last[use_cache] = generate(model, prompt, n, temperature=0.0, use_cache=use_cache)

    t = side_by_side({"kv_cache": lambda: run(True), "recompute": lambda: run(False)}, repeats)
    return {
        "new_tokens": n, "batch_size": batch_size, "requested": [r for r in lengths if min(r, room) == n],
        "time": t, "tokens_per_s": {k: batch_size * n / v["median_s"] for k, v in t.items()},
        "speedup": paired_ratio(t["recompute"], t["kv_cache"]),
        # Both paths compute the same logits up to rounding (tests/test_model.py); a near-tie between
        # two tokens of a random model may still tip differently, so this is recorded, not asserted.
        "same_tokens": last[True] == last[False],
    }
