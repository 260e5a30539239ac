"""Sampling: greedy, temperature, top-k and top-p, on top of the KV cache."""

from __future__ import annotations

import torch

from .model import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row. logits: (batch, vocab) -> (batch,). temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # the first token always stays
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
    """Continue each row of prompt (batch, t0). Returns the new tokens of each row, cut before its
    first eot_id. Stops at max_new_tokens or at the model's context length. use_cache=False
    recomputes the whole prefix at every step (slow; kept to show what the cache saves)."""
    was_training = model.training
    model.eval()
    batch, t0 = prompt.shape
    max_new_tokens = min(max_new_tokens, model.config.context_length - t0)
    cache = KVCache.for_model(model, batch) if use_cache else None
    seq = prompt
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    logits = model(prompt, cache)[:, -1] if use_cache else None
    for _ in range(max(0, max_new_tokens)):
        if not use_cache:
            logits = model(seq)[:, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        seq = torch.cat([seq, token[:, None]], dim=1)
        if eot_id is not None:
            done |= token == eot_id
            if done.all():
                break
        if use_cache and seq.shape[1] < model.config.context_length:
            logits = model(token[:, None], cache)[:, -1]
    model.train(was_training)
    out = []
    for row in seq[:, t0:].tolist():
        out.append(row[: row.index(eot_id)] if eot_id in row else row)
    return out
