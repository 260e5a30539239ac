"""Sampling: greedy, temperature, top-k and top-p, on top of the KV cache."""

from __future__ import annotations

import torch

from .model import GPT, KVCache


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not 0 <= temperature < float("inf"):  # written so that NaN fails too
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits: (batch, vocab); keep the k largest per row (ties with the k-th included), -inf elsewhere."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability reaches p, -inf elsewhere. The most likely token always stays."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= p  # the mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row. logits: (batch, vocab) -> (batch,). temperature 0 is greedy."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature < 1e-3:  # small enough for logits / temperature to overflow to inf (and softmax to NaN):
        logits = logits - logits.max(-1, keepdim=True).values  # the largest becomes 0, the rest negative
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# inference_mode rather than no_grad: it also skips autograd's bookkeeping on every tensor (version
# counters, views), which is a fifth of a decoding step of this small model at batch 1 (same tokens).
@torch.inference_mode()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
    """Continue each row of prompt (batch, t0). Returns the new tokens of each row, cut before its
    first eot_id. Stops at max_new_tokens, when every row has produced eot_id, or when the sequence
    fills the model's context. use_cache=False recomputes the whole prefix at every step (slow; kept
    to show what the cache saves)."""
    check_sampling_args(temperature, top_k, top_p)
    ctx = model.config.context_length
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be token ids of shape (batch, t0) with t0 >= 1, got {tuple(prompt.shape)}")
    batch, t0 = prompt.shape
    if t0 > ctx:
        raise ValueError(f"the prompt has {t0} tokens, more than the model's context_length {ctx}")
    n_new = max(0, min(max_new_tokens, ctx - t0))
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, batch, max_len=t0 + n_new) if use_cache else None
        seq = prompt
        done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        logits = model(prompt, cache)[:, -1] if use_cache and n_new else None
        for step in range(n_new):
            if not use_cache:
                logits = model(seq)[:, -1]
            token = sample_next(logits, temperature, top_k, top_p, generator)
            seq = torch.cat([seq, token[:, None]], dim=1)
            if eot_id is not None:
                done |= token == eot_id  # finished rows keep going; their extra tokens are cut below
                if done.all():
                    break
            if use_cache and step + 1 < n_new:
                logits = model(token[:, None], cache)[:, -1]
    finally:
        model.train(was_training)
    rows = seq[:, t0:].tolist()
    return [row[: row.index(eot_id)] if eot_id in row else row for row in rows]
