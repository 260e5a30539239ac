"""Tokenizer: BPE training time, and encoding through tiktoken against plain Python.

The corpus is the story world's, drawn as `microlm pretrain` draws it (microlm.world.generate_splits),
and the BPE is trained as pretraining trains it (`<|endoftext|>` between stories, GPTConfig's
vocab_size requested). Encoding compares four ways to the same ids:

  tiktoken        Tokenizer.encode_ordinary: tiktoken's Rust BPE on one thread, the whole text at once
  python          tokenizer.encode_python: the same merges in plain Python (the teaching version)
  per_story       Tokenizer.encode_batch: one encode_ordinary call per story, one after another, as
                  microlm.data.encode_documents encodes the corpus
  threads         tiktoken's encode_ordinary_batch: the same calls spread over a pool of threads,
                  whose overhead per text outweighs the work of a short story

The story corpus is an easy case for plain Python: its BPE stops once every word is a token, so
encode_python never merges (a whole word that is a token is taken as it is, as tiktoken does too). So
the two encoders are also compared on English prose, this repository's README files, where most words
are not tokens of the story BPE and are merged up from bytes.

tiktoken and python must give identical ids on the same text; the benchmark records it, and run.py
exits non-zero if they differ (a wrong answer, unlike a slow one, is a bug).
"""

from __future__ import annotations

from pathlib import Path

from microlm.model import GPTConfig
from microlm.tokenizer import EOT, BPEResult, Tokenizer, encode_python, train_bpe
from microlm.world import World, generate_splits
from timing import paired_ratio, side_by_side, target


def story_corpus(n_stories: int, seed: int = 1337) -> list[str]:
    """n_stories training stories of the default world (TrainConfig's default seed, as pretraining)."""
    return [s.text for s in generate_splits(World(), {"train": n_stories}, seed)["train"]]


def story_bpe(stories: list[str]) -> BPEResult:
    """The BPE `microlm pretrain` would train on these stories; it stops early when no pair is left
    (349 tokens on the story corpus, of the 512 GPTConfig requests). The other benchmarks size their
    models' vocabulary by it."""
    return train_bpe(EOT.join(stories), GPTConfig().vocab_size)


def bench_tokenizer(stories: list[str], bpe: BPEResult, repeats: int, encode_chars: int) -> dict:
    """`bpe` is story_bpe(stories), trained once already; here it is trained again, timed."""
    train_text = EOT.join(stories)
    print(f"  tokenizer  BPE training on {len(stories):,} stories", flush=True)
    # No warm-up round: training it for story_bpe was one.
    bpe_time = side_by_side({"train_bpe": lambda: train_bpe(train_text, GPTConfig().vocab_size)}, repeats, warmup=0)
    tokenizer = Tokenizer.from_bpe(bpe)

    # Plain Python is slow, so it encodes the first encode_chars characters (cut after a whole story);
    # every contender encodes that same text.
    docs, n = [], 0
    for s in stories:
        if docs and n + len(s) + 1 > encode_chars:
            break
        docs.append(s)
        n += len(s) + 1
    text = "\n".join(docs) + "\n"
    mb = len(text.encode("utf-8")) / 1e6
    print(f"  tokenizer  encoding {mb:.2f} MB: tiktoken vs plain Python", flush=True)
    t = side_by_side({"tiktoken": lambda: tokenizer.encode_ordinary(text),
                      "python": lambda: encode_python(text, bpe.mergeable_ranks, bpe.pattern),
                      "per_story": lambda: tokenizer.encode_batch(docs),
                      "threads": lambda: tokenizer.encoding.encode_ordinary_batch(docs)}, repeats)
    ids = tokenizer.encode_ordinary(text)
    identical = ids == encode_python(text, bpe.mergeable_ranks, bpe.pattern)
    identical &= tokenizer.encode_batch(docs) == tokenizer.encoding.encode_ordinary_batch(docs)
    ratio = paired_ratio(t["python"], t["tiktoken"])

    root = Path(__file__).resolve().parent.parent
    # the repository's own prose: every README and the history that moved out of the main one
    texts = [p for p in sorted(root.glob("**/README.md")) if ".venv" not in p.parts] + [root / "results" / "HISTORY.md"]
    readmes = "\n".join(p.read_text(encoding="utf-8") for p in texts)
    prose = (readmes * (1 + encode_chars // 4 // len(readmes)))[: encode_chars // 4]
    prose_mb = len(prose.encode("utf-8")) / 1e6
    print(f"  tokenizer  encoding {prose_mb:.2f} MB of README prose: tiktoken vs plain Python", flush=True)
    tp = side_by_side({"tiktoken": lambda: tokenizer.encode_ordinary(prose),
                       "python": lambda: encode_python(prose, bpe.mergeable_ranks, bpe.pattern)}, repeats)
    prose_ids = tokenizer.encode_ordinary(prose)
    identical &= prose_ids == encode_python(prose, bpe.mergeable_ranks, bpe.pattern)
    prose_ratio = paired_ratio(tp["python"], tp["tiktoken"])
    return {
        "n_stories": len(stories), "train_chars": len(train_text),
        "vocab": {"requested": GPTConfig().vocab_size, "n_vocab": tokenizer.n_vocab, "merges": bpe.merges_done,
                  "stopped_early": bpe.stopped_early},
        "train_bpe": bpe_time["train_bpe"],
        "encode_mb": mb, "encode_tokens": len(ids), "encode": t,
        "encode_mb_per_s": {k: mb / v["median_s"] for k, v in t.items()},
        "ratio_to_python": {k: paired_ratio(t["python"], v) for k, v in t.items() if k != "python"},
        "ratio_tiktoken_python": ratio, "identical_ids": identical,
        "prose": {"mb": prose_mb, "chars_per_token": len(prose) / len(prose_ids), "encode": tp,
                  "ratio_tiktoken_python": prose_ratio},
        "targets": {"tiktoken_vs_python": target(ratio["median"], ">=", 20.0),
                    "tiktoken_vs_python_prose": target(prose_ratio["median"], ">=", 20.0)},
    }
