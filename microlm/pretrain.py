"""Pretraining, end to end: corpus -> tokenizer -> model -> training -> evaluation, into one run folder.

    run_pretrain(run_dir, GPTConfig(), TrainConfig())    what `make pretrain` runs (runs/pretrain)

1. The data: the story world's corpus, whose exact entropy bounds the loss, or any UTF-8 text file.
2. A byte-level BPE tokenizer trained on the training split (tokenizer.py), served through tiktoken.
3. The GPT (model.py), sized by the tokenizer's vocabulary.
4. Training: the loop in train.py, on random windows of the token stream.
5. The evaluation: loss against the bound, sampled stories scored by the world, look-ups and probes.
Every file goes into the run folder (see runs.py for the layout); `microlm pretrain` maps its flags here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from .checkpoint import changed_settings, load_json, save_json, save_text, save_weights
from .data import (CorpusError, build_story_corpus, document_rows, encode_documents, read_corpus, read_stories,
                   split_text_corpus, stream_rows, window_batch)
from .model import GPT, GPTConfig
from .runs import UsageError, check_run_dir, peak_rss_mib, prepare_run_dir, provenance, sha256_file, sha256_text
from .tokenizer import EOT, Tokenizer, train_bpe
from .train import TrainConfig, read_metrics, train
from .world import World, log_prob

# Corpus sizes for `make pretrain` on a 2-core laptop CPU (see data/README.md for why these).
STORY_SPLITS = {"train": 60_000, "val": 2_000}
LOOKUP_STORIES = 500  # validation stories scored for look-ups and key probes at the end of pretraining


def run_pretrain(run_dir, model_cfg: GPTConfig, train_cfg: TrainConfig, *, corpus=None, data_dir="data",
                 sizes=STORY_SPLITS, tokenizer_name: str = "trained", n_samples: int = 200, device="cpu",
                 resume=False, overwrite=False, progress=True) -> dict:
    """Pretrain into the folder `run_dir`: the story corpus of `sizes` in `data_dir` (or the text file
    `corpus`), a tokenizer trained on its training split (or tiktoken's cached gpt2), the model, then
    the evaluation. model_cfg.vocab_size is the tokenizer's request; the model gets its n_vocab.
    Returns the summary that summary.json holds."""
    run_dir = Path(run_dir)
    if n_samples < 0 or min(sizes.values()) < 1:
        raise ValueError(f"run_pretrain needs n_samples >= 0 and sizes >= 1, got {n_samples} and {sizes}")
    check_run_dir(run_dir, resume, overwrite)  # refuse at once: nothing is written before it (data_dir included)
    if tokenizer_name == "trained" and model_cfg.vocab_size < 257:  # said now, not after the corpus is built
        raise ValueError(f"--vocab-size must be at least 257 (256 byte tokens and the end-of-text token), got "
                         f"{model_cfg.vocab_size}")
    stock = Tokenizer.stock("gpt2") if tokenizer_name == "gpt2" and not resume else None  # or say what to do

    # 1. Data: the story world (with its exact bound) or the user's text file.
    world, bound = None, None
    if corpus:
        text = read_corpus(corpus, min_chars=2000)
        train_text, val_text = split_text_corpus(text)
        train_docs, val_docs = [train_text], [val_text]
        data_info = {"kind": "text", "path": str(corpus)}
        print(f"corpus  {corpus}: {len(train_text):,} train and {len(val_text):,} validation characters")
    else:
        world = World()
        stats = build_story_corpus(data_dir, world, sizes, train_cfg.seed)
        train_docs = read_stories(Path(data_dir) / "train.txt")
        val_docs = read_stories(Path(data_dir) / "val.txt")
        bound = stats["splits"]["val"]["bits_per_char"]
        data_info = {"kind": "stories", "dir": str(data_dir), "world": world.to_dict(), "stats": stats["splits"]}
        print(f"corpus  {len(train_docs):,} train / {len(val_docs):,} validation stories in {data_dir}/; "
              f"exact entropy of the validation split: {bound:.4f} bits/char "
              f"({stats['splits']['val']['bits_per_story']:.1f} bits/story)")
    data_info["train_sha256"] = sha256_text("\n".join(train_docs))
    data_info["val_sha256"] = sha256_text("\n".join(val_docs))

    # 2. Tokenizer: trained on the training split only (reused when resuming).
    tok_path = run_dir / "tokenizer.json"
    if resume:
        tokenizer = Tokenizer.load(tok_path)
        saved = load_json(run_dir / "config.json", "run config")
        if saved.get("data", {}).get("train_sha256") != data_info["train_sha256"]:
            raise UsageError(f"--resume: the training data differs from the data {run_dir} was trained on")
    elif stock is not None:
        tokenizer = stock
    else:
        bpe = train_bpe(EOT.join(train_docs), model_cfg.vocab_size)
        if bpe.stopped_early:
            print(f"tokenizer: stopped after {bpe.merges_done} of {bpe.merges_requested} merges: no pair left to merge")
        tokenizer = Tokenizer.from_bpe(bpe)
    # Stories are separate documents: attention stays inside each (a plain text file is one document).
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.n_vocab, eot_id=tokenizer.eot_id if world else -1)
    if resume:
        changed = changed_settings({**saved.get("model", {}), **saved.get("train", {})},
                                   {**model_cfg.to_dict(), **dataclasses.asdict(train_cfg)})
        if changed:
            raise UsageError(f"--resume: {run_dir} was trained with other settings: {changed}; resume with the same "
                             "flags, or start again with --overwrite")
    train_stream = encode_documents(tokenizer, train_docs)
    if len(train_stream) < model_cfg.context_length + 2:
        raise CorpusError(f"{corpus or data_dir}: {len(train_stream)} training tokens, fewer than one "
                          f"window of --context-length {model_cfg.context_length}; use more text or a shorter context")
    if world:
        evalset = document_rows(tokenizer, val_docs, model_cfg.context_length)
    else:
        try:
            evalset = stream_rows(tokenizer, encode_documents(tokenizer, val_docs), model_cfg.context_length)
        except CorpusError as e:
            raise CorpusError(f"{corpus}: {e}") from None
    chars_per_token = sum(len(d) + 1 for d in train_docs) / (len(train_stream) - 1)
    print(f"tokens  {len(train_stream):,} training tokens, {chars_per_token:.2f} characters per token, "
          f"vocabulary {tokenizer.n_vocab}")

    # Only now touch the run folder: a bad corpus, tokenizer or context must not cost the run that
    # --overwrite was about to replace.
    prepare_run_dir(run_dir, resume, overwrite)
    if not resume:
        tokenizer.save(tok_path)
    torch.manual_seed(train_cfg.seed)

    # 3. Model.
    model = GPT(model_cfg).to(device)
    counts = model.param_counts()
    print("model   " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    save_json(run_dir / "config.json", {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                                        "data": data_info, "tokenizer": {"n_vocab": tokenizer.n_vocab,
                                        "sha256": sha256_file(tok_path)}, "provenance": provenance(train_cfg.seed)})

    # 4. Train.
    from .evaluate import evaluate_lm
    summary = train(
        model, train_cfg,
        get_batch=lambda i: window_batch(train_stream, train_cfg.batch_size, model_cfg.context_length, train_cfg.seed, i),
        evaluate=lambda m: evaluate_lm(m, evalset),
        run_dir=run_dir, resume=resume, flops_per_token=model.flops_per_token(),
        chars_per_token=chars_per_token, progress=progress,
    )
    save_weights(run_dir / "model.safetensors", model)
    print(f"trained {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {summary['train_seconds']:.0f} s: "
          f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['mfu']:.1%} of the measured fp32 matmul peak "
          f"({summary['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")

    # 5. Evaluate, sample, plot.
    return finish_pretrain(run_dir, model, tokenizer, summary, world, bound, n_samples, train_cfg.seed, val_docs)


PROBE_LABELS = {"place": "who moved, at the destination", "holder": "which object, at the receiver"}


def probe_row(p: dict) -> str:
    """One key_probes entry: accuracy after each block, and chance."""
    return (" / ".join(f"{a:.1%}" for a in p["by_layer"]) + f" after blocks 1-{len(p['by_layer'])} "
            f"(chance {p['chance']:.1%}; {p['n']} facts)")


def finish_pretrain(run_dir, model, tokenizer, summary, world, bound, n_samples, seed, val_docs=()) -> dict:
    from .evaluate import key_probes, lookup_accuracy, sample_texts, story_validity
    from .plots import plot_pretrain_loss
    result = {k: summary[k] for k in ("val_loss", "val_ppl", "val_bpc", "tokens_per_s", "mfu", "steps",
                                      "tokens_seen", "train_seconds", "matmul_peak_flops", "flops_per_token")
              if k in summary}
    print(f"val     loss {summary['val_loss']:.4f} nats/token, perplexity {summary['val_ppl']:.3f}, "
          f"{summary['val_bpc']:.4f} bits/char")
    if bound:
        result.update(bound_bpc=bound, bpc_over_bound=summary["val_bpc"] / bound)
        print(f"        the exact entropy bound is {bound:.4f} bits/char: the model is at "
              f"{summary['val_bpc'] / bound:.3f} x the bound")
    samples = sample_texts(model, tokenizer, n_samples, temperature=1.0, seed=seed) if n_samples else []
    lines = []
    if world and samples:
        valid = [log_prob(world, s) for s in samples]
        result["sample_validity"] = story_validity(world, samples)
        result["n_samples"] = len(samples)
        lines = [f"[{'valid' if lp > -math.inf else 'INVALID'}] {s}" for s, lp in zip(samples, valid)]
        print(f"samples {result['sample_validity']:.1%} of {len(samples)} stories sampled at temperature 1.0 "
              "are valid in the story world")
    else:
        lines = samples
    if world and val_docs:
        # Which of the world's rules the model has learned: its top choice where a story restates a fact
        result["lookups"] = lookup_accuracy(model, tokenizer, world, list(val_docs[:LOOKUP_STORIES]))
        print(f"lookups how often the model's top choice is the fact a story restates "
              f"({min(len(val_docs), LOOKUP_STORIES)} validation stories; data/README.md):")
        for name, c in result["lookups"].items():
            print(f"        {name:<24} {c['accuracy']:6.1%} of {c['total']}")
        # Why a look-up fails: is the key (who moved, which object) written where the fact was set?
        result["key_probes"] = key_probes(model, tokenizer, world, list(val_docs[:LOOKUP_STORIES]))
        print("probes  is the key written at the word that set the fact? held-out accuracy of a linear probe, "
              "after each block:")
        for what, p in result["key_probes"].items():
            print(f"        {PROBE_LABELS[what]:<33} {probe_row(p)}")
    save_text(run_dir / "samples.txt", "".join(line + "\n" for line in lines))
    for line in lines[:3]:
        print("        " + line)
    plot_pretrain_loss(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png", bound)
    result["peak_rss_mib"] = peak_rss_mib()  # the whole command: data, tokenizer, training, sampling
    save_json(run_dir / "summary.json", result)
    print(f"wrote   {run_dir}/: model.safetensors, config.json, tokenizer.json, metrics.jsonl, loss.png, "
          "samples.txt, summary.json")
    return result


