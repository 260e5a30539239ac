"""Measuring a model: bits per character against the exact bound, and validity of its samples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE, EvalSet
from .generate import generate
from .world import World, is_valid


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, evalset: EvalSet, batch_size: int = 32) -> dict:
    """Validation loss (nats/token), perplexity and bits per character over every scored target."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, n_tokens = 0.0, 0
    for i in range(0, len(evalset.inputs), batch_size):
        x = evalset.inputs[i: i + batch_size].to(device)
        y = evalset.targets[i: i + batch_size].to(device)
        logits = model(x)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
        n_tokens += (y != IGNORE).sum().item()
    model.train(was_training)
    loss = nll / n_tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_bpc": nll / math.log(2) / evalset.n_chars}


def sample_texts(model, tokenizer, n: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, batch_size: int = 50, prompt: str = "") -> list[str]:
    """`n` documents sampled from `<|endoftext|>` + prompt, each cut at the first `<|endoftext|>`."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer.eot_id] + tokenizer.encode_ordinary(prompt)
    g = torch.Generator(device=device).manual_seed(seed)
    max_new = model.config.context_length - len(prompt_ids)
    out = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        x = torch.tensor([prompt_ids] * rows, device=device)
        for ids in generate(model, x, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                            eot_id=tokenizer.eot_id, generator=g):
            out.append(prompt + tokenizer.decode(ids))
    return out


def story_validity(world: World, texts: list[str]) -> float:
    """Fraction of texts that are stories the world can tell (a finite log-probability)."""
    return sum(is_valid(world, t) for t in texts) / len(texts)
