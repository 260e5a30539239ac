"""Generation: what the KV cache saves.

Greedy decoding at batch 1 from `<|endoftext|>` (as `microlm sample` starts a story), through
microlm.generate.generate twice: with the cache, each step feeds one token and attends to the stored
keys and values; with use_cache=False, each step runs the whole prefix through the model again, so
the work per step grows with the length and the total with its square. The ratio therefore grows
with the number of new tokens, which the context caps (the prompt takes one position).
"""

from __future__ import annotations

import torch

from microlm.generate import generate
from microlm.model import GPT, GPTConfig
from timing import side_by_side, target


def bench_generation(config: GPTConfig, lengths: tuple[int, ...], repeats: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config).eval()  # random weights: the speed does not depend on them
    prompt = torch.tensor([[max(config.eot_id, 0)]])
    room = config.context_length - prompt.shape[1]
    rows = []
    for n in sorted({min(n, room) for n in lengths}):  # lengths the context caps to the same n run once
        print(f"  generation  {n} new tokens", flush=True)

        def run(use_cache: bool, n=n):
            return generate(model, prompt, n, temperature=0.0, use_cache=use_cache)

        t = side_by_side({"kv_cache": lambda: run(True), "recompute": lambda: run(False)}, repeats)
        rows.append({
            "new_tokens": n, "requested": [r for r in lengths if min(r, room) == n],
            "time": t, "tokens_per_s": {k: n / v["median_s"] for k, v in t.items()},
            "speedup": t["recompute"]["median_s"] / t["kv_cache"]["median_s"],
            # Both paths compute the same logits up to rounding (tests/test_model.py); a near-tie between
            # two tokens of a random model may still tip differently, so this is recorded, not asserted.
            "same_tokens": run(True) == run(False),
        })
    return {"batch_size": 1, "context_length": config.context_length, "lengths": rows,
            "targets": {"kv_cache_speedup_longest": target(rows[-1]["speedup"], ">=", 10.0)}}
