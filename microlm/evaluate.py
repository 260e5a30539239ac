"""Measuring a model: bits per character against the exact bound, and validity of its samples."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from .data import IGNORE, EvalSet
from .generate import generate
from .model import KVCache
from .world import World, is_valid, restated_facts, stored_facts


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


def fit_prompt(tokenizer, prompt: str, context: int, truncate: bool = False) -> tuple[list[int], int]:
    """`<|endoftext|> prompt` as token ids, and how many were dropped. The model sees at most `context`
    positions and one must be left for a new token: a longer prompt is refused, or with truncate=True
    cut from the left (its end is what the continuation follows)."""
    ids = [tokenizer.eot_id] + tokenizer.encode_ordinary(prompt)
    room = context - 1
    if len(ids) <= room:
        return ids, 0
    if not truncate:
        raise ValueError(f"--prompt is {len(ids)} tokens (with the leading <|endoftext|>) but the model's context "
                         f"is {context}, which leaves room for {room}; shorten it, or pass --truncate-prompt to keep "
                         f"its last {room} tokens")
    return ids[-room:], len(ids) - room


def sample_texts(model, tokenizer, n: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, batch_size: int = 50, prompt: str = "",
                 truncate_prompt: bool = False) -> list[str]:
    """`n` documents sampled from `<|endoftext|>` + prompt, each cut at the first `<|endoftext|>` and
    returned after the whole prompt (also when the model saw only its end: truncate_prompt)."""
    device = next(model.parameters()).device
    ids, _ = fit_prompt(tokenizer, prompt, model.config.context_length, truncate_prompt)
    g = torch.Generator(device=device).manual_seed(seed)
    max_new = model.config.context_length - len(ids)
    out = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        x = torch.tensor([ids] * rows, device=device)
        for new in generate(model, x, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                            eot_id=tokenizer.eot_id, generator=g):
            out.append(prompt + tokenizer.decode(new))
    return out


def story_validity(world: World, texts: list[str]) -> float:
    """Fraction of texts that are stories the world can tell (a finite log-probability)."""
    return sum(is_valid(world, t) for t in texts) / len(texts)


def word_position(tokenizer, story: str, offset: int) -> int:
    """Index, in [eot] + tokens(story), of the first token of the word at character `offset`. The word
    starts after a space; the text before that space encodes to the same tokens as the start of the
    whole story, so the word's first token is the next one."""
    return 1 + len(tokenizer.encode_ordinary(story[: offset - 1]))


@torch.no_grad()
def lookup_accuracy(model, tokenizer, world: World, stories: list[str]) -> dict[str, dict]:
    """How often the model's top choice is the restated fact (see world.restated_facts), by what it
    restates and how long ago the story said it: {"place, earlier event": {"correct", "total", "accuracy"}, ...}.
    Teacher-forced on valid stories; scores the first token of the restated word. Bits per character
    average over everything; this shows which look-ups the model has learned and which it guesses."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts: dict[str, list[int]] = {}
    for story in stories:
        ids = [tokenizer.eot_id] + tokenizer.encode_ordinary(story)
        if len(ids) > model.config.context_length:
            continue
        best = model(torch.tensor([ids], device=device))[0].argmax(-1).tolist()
        for offset, what, when in restated_facts(world, story):
            pos = word_position(tokenizer, story, offset)
            c = counts.setdefault(f"{what}, {when}", [0, 0])
            c[0] += best[pos - 1] == ids[pos]
            c[1] += 1
    model.train(was_training)
    order = [f"{w}, {t}" for w in ("place", "holder") for t in ("intro", "previous event", "earlier event")]
    return {k: {"correct": counts[k][0], "total": counts[k][1], "accuracy": counts[k][0] / counts[k][1]}
            for k in order if k in counts}


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream after each block: ids (1, seq) -> (n_layers, seq, d_model)."""
    outs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outs.append(out[0])) for block in model.blocks]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(outs)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a linear probe: a softmax regression trained (full batch, Adam) to read
    `labels` (n,) from `features` (n, d) on a seeded 80% of the rows, scored on the other 20%. High
    accuracy means the information is there, and in a form a single matrix (such as an attention
    head's key projection) can read."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    x = features.float()
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(probe(x[train]), labels[train]).backward()
            opt.step()
    with torch.no_grad():
        return (probe(x[test]).argmax(-1) == labels[test]).float().mean().item()


@torch.no_grad()
def key_probes(model, tokenizer, world: World, stories: list[str]) -> dict[str, dict]:
    """Can the model find a fact by its key? At the word where each event sets a fact
    (world.stored_facts: a move's destination, a pass's receiver), a linear probe reads the fact's key
    (who moved; which object passed) from the residual stream after each block. Restating the fact
    later means finding this word by that key, which attention can do only if the key is written here.
    Returns {"place"/"holder": {"n", "chance" (the commonest key's share), "by_layer": [accuracy, ...]}}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats: dict[str, list[torch.Tensor]] = {"place": [], "holder": []}
    keys: dict[str, list[str]] = {"place": [], "holder": []}
    for story in stories:
        ids = [tokenizer.eot_id] + tokenizer.encode_ordinary(story)
        if len(ids) > model.config.context_length:
            continue
        h = hidden_states(model, torch.tensor([ids], device=device)).cpu()
        for offset, what, key in stored_facts(world, story):
            feats[what].append(h[:, word_position(tokenizer, story, offset)])
            keys[what].append(key)
    model.train(was_training)
    out = {}
    for what in ("place", "holder"):
        if len(keys[what]) < 20:
            continue
        names = sorted(set(keys[what]))
        labels = torch.tensor([names.index(k) for k in keys[what]])
        x = torch.stack(feats[what])  # (n, n_layers, d_model)
        out[what] = {"n": len(labels), "chance": labels.bincount().max().item() / len(labels),
                     "by_layer": [probe_accuracy(x[:, layer], labels) for layer in range(x.shape[1])]}
    return out


# ---- fine-tuning: exact match, merged vs unmerged ----------------------------------------------


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 12, batch_size: int = 64) -> list[str]:
    """The greedy continuation of `<|endoftext|> prompt` for each prompt, up to the end token or a newline.
    Prompts of equal token length are batched together, so no padding can change an answer."""
    device = next(model.parameters()).device
    encoded = [[tokenizer.eot_id] + tokenizer.encode_ordinary(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            rows = group[start: start + batch_size]
            x = torch.tensor([encoded[i] for i in rows], device=device)
            for i, ids in zip(rows, generate(model, x, max_new_tokens, temperature=0.0, eot_id=tokenizer.eot_id)):
                out[i] = tokenizer.decode(ids).split("\n")[0]
    return out


def exact_match(answers: list[str], examples: list[dict]) -> float:
    """Fraction of answers equal to the reference response (surrounding spaces ignored)."""
    return sum(a.strip() == ex["response"].strip() for a, ex in zip(answers, examples)) / len(examples)


@torch.no_grad()
def logits_of(model, batches) -> list[torch.Tensor]:
    """Logits at every real (non-padding) position: batches is a list of (inputs (B, T), lengths (B,))."""
    model.eval()
    out = []
    for x, lengths in batches:
        logits = model(x.to(next(model.parameters()).device)).cpu()
        out += [row[:n] for row, n in zip(logits, lengths)]
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def timing_stats(seconds: list[float]) -> dict:
    """Median, min and max of repeated timings, and the timings themselves in the order they were
    taken, so that two contenders timed in turns can be compared round by round (paired_ratio)."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "n": len(seconds), "samples_s": list(seconds)}


def paired_ratio(num: dict, den: dict) -> dict:
    """num / den for two timings taken in turns (timing_stats): the ratio in each round, then their
    median, min and max. A drift of the machine (another process, the clock) slows both contenders of
    a round alike and cancels in that round's ratio, so the median is steadier than the ratio of the
    two medians, and the spread says whether a difference is real: a ratio whose min and max lie on
    either side of 1 is not. Timings without their samples (files from before) give the ratio of the
    medians, with no spread."""
    if "samples_s" not in num or "samples_s" not in den:
        r = num["median_s"] / den["median_s"]
        return {"median": r, "min": None, "max": None}
    ratios = [a / b for a, b in zip(num["samples_s"], den["samples_s"], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def format_ratio(r: dict, fmt: str = ".2f", unit: str = "x", note: str = "") -> str:
    """A paired_ratio as '0.93x (0.90-0.96)' (with `note` after the range), or '0.93x' where the rounds
    were not kept."""
    spread = f" ({r['min']:{fmt}}-{r['max']:{fmt}}{note})" if r["min"] is not None else ""
    return f"{r['median']:{fmt}}{unit}{spread}"


@torch.inference_mode()  # as generate
def decode(model, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Greedy decoding's work with the tokens fixed: prefill `prompt` (1, t0) into a KV cache, then feed
    `tokens` one at a time, taking the argmax of every step's logits as greedy decoding does. Returns
    the argmaxes. Models that would choose different tokens still do exactly the same work here."""
    model.eval()
    cache = KVCache.for_model(model, 1, max_len=prompt.shape[1] + len(tokens))
    picks = [model(prompt, cache)[:, -1].argmax(-1)]
    for token in torch.tensor(tokens[:-1], device=prompt.device).view(-1, 1, 1):
        picks.append(model(token, cache)[:, -1].argmax(-1))
    return torch.cat(picks)


@torch.inference_mode()  # as generate
def per_token_latency(models: dict, prompt: torch.Tensor, n_tokens: int = 64, repeats: int = 7,
                      tokens: list[int] | None = None) -> dict:
    """Seconds per generated token (batch 1, KV cache; `decode`: greedy decoding's work on fixed tokens)
    for each model, measured side by side: the models take turns in every repeat, each repeat starting
    with the next model, so drifts of the machine and the order of the turns hit them all alike. Per
    model: timing_stats of the repeats.

    Every model decodes the same tokens: `tokens` if given (n_tokens is then unused), else the first
    model's greedy continuation of n_tokens. A fine-tuned model that answers and writes
    `<|endoftext|>` would otherwise take the document-mask path for the rest and be timed on different
    work than the base, which goes on telling a story."""
    if tokens is None:
        tokens = generate(next(iter(models.values())), prompt, n_tokens, temperature=0.0)[0]  # no eot_id: n_tokens
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():  # warm-up: one full measurement each, not kept
        decode(m, prompt, tokens)
    names = list(models)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t = time.perf_counter()
            decode(models[name], prompt, tokens)
            times[name].append((time.perf_counter() - t) / len(tokens))
    return {name: timing_stats(ts) for name, ts in times.items()}
