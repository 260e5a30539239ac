"""Text to training batches: corpus files, token streams, training windows and evaluation rows.

Pretraining reads a stream of tokens, `<|endoftext|> story <|endoftext|> story ...`, and learns from
random windows of it. Evaluation on the story world is *document aligned*: every evaluation row starts
at an `<|endoftext|>` and holds whole stories only, so the model sees each story from its start, as the
generator did, and its loss can be compared with the generator's exact entropy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_json, save_json, save_text
from .world import World, entropy_stats, generate_splits

IGNORE = -100  # target value that F.cross_entropy skips (padding, prompt positions)


class CorpusError(ValueError):
    """A corpus file that cannot be trained on; the message names the file and what to do."""


def read_corpus(path: str | Path, min_chars: int = 1) -> str:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found; pass an existing UTF-8 text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CorpusError(f"{path}: not UTF-8 (byte {e.start}, line {line}); re-save the file as UTF-8") from None
    if not text.strip():
        raise CorpusError(f"{path}: the file is empty; a corpus needs text to learn from")
    if len(text) < min_chars:
        raise CorpusError(f"{path}: only {len(text)} characters; need at least {min_chars} "
                          "(enough for a validation split and one training window)")
    return text


# ---- the story corpus on disk ------------------------------------------------------------------


def build_story_corpus(data_dir: str | Path, world: World, sizes: dict[str, int], seed: int) -> dict:
    """Write `train.txt`, `val.txt` (one story per line) and `stats.json` (sizes and exact entropy)
    under `data_dir`, unless files made with the same world, sizes and seed are already there."""
    data_dir = Path(data_dir)
    recipe = {"world": world.to_dict(), "sizes": sizes, "seed": seed}
    stats_path = data_dir / "stats.json"
    if stats_path.is_file() and all((data_dir / f"{k}.txt").is_file() for k in sizes):
        stats = load_json(stats_path, "corpus stats")
        if stats.get("recipe") == json_roundtrip(recipe):
            return stats
    splits = generate_splits(world, sizes, seed)
    for name, stories in splits.items():
        save_text(data_dir / f"{name}.txt", "".join(s.text + "\n" for s in stories))
    stats = {"recipe": recipe, "splits": {k: entropy_stats(v) for k, v in splits.items()}}
    save_json(stats_path, stats)  # written last: its presence means the text files are complete
    return stats


def json_roundtrip(obj):
    return json.loads(json.dumps(obj))


def read_stories(path: str | Path) -> list[str]:
    return [line for line in read_corpus(path).split("\n") if line]


# ---- tokens ------------------------------------------------------------------------------------


def encode_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """`<|endoftext|> d1 <|endoftext|> d2 ... <|endoftext|>` as one int32 array."""
    eot = tokenizer.eot_id
    ids = [eot]
    for doc in tokenizer.encode_batch(docs):
        ids.extend(doc)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int32)


def window_batch(stream: np.ndarray, batch_size: int, context: int, seed: int, step: int):
    """Random windows for training step `step`. The positions come from (seed, step) alone, so a run
    resumed at step s draws exactly the batches an uninterrupted run would have drawn.
    Known off-by-one, kept: starts are drawn from 0 .. len - context - 2, so the last window (start
    len - context - 1, whose last target is the stream's last token) is never drawn. Fixing the bound
    changes every draw, and so every result the README reports, to add one start in about three million
    (the default training stream has 2.9 million tokens)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - context - 1, (batch_size,), generator=g).numpy()
    rows = np.stack([stream[s: s + context + 1] for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


@dataclass
class EvalSet:
    """Rows to score: `inputs`/`targets` (rows, context) with IGNORE where nothing is predicted, and
    the number of characters the scored targets stand for (for bits per character)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    n_chars: int


def document_rows(tokenizer, docs: list[str], context: int) -> EvalSet:
    """Pack whole documents into rows `<|endoftext|> d1 <|endoftext|> d2 <|endoftext|> pad...`.
    Every document token and the end token after it are scored; each end token stands for the
    newline that ends a story, so characters = len(doc) + 1."""
    eot = tokenizer.eot_id
    rows, row = [], [eot]
    for text, ids in zip(docs, tokenizer.encode_batch(docs)):
        piece = ids + [eot]
        if len(piece) + 1 > context + 1:
            raise ValueError(f"a document of {len(piece)} tokens does not fit the context of {context} "
                             f"(use --context-length {len(piece)} or more): {text[:60]!r}...")
        if len(row) + len(piece) > context + 1:
            rows.append(row)
            row = [eot]
        row += piece
    rows.append(row)
    x = torch.full((len(rows), context), eot, dtype=torch.long)
    y = torch.full((len(rows), context), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        r = torch.tensor(r)
        x[i, : len(r) - 1], y[i, : len(r) - 1] = r[:-1], r[1:]
    return EvalSet(x, y, sum(len(d) + 1 for d in docs))


def stream_rows(tokenizer, stream: np.ndarray, context: int, max_rows: int | None = None) -> EvalSet:
    """Consecutive, non-overlapping windows of a token stream (for a corpus that is not stories). The
    last (len - 1) % context targets, less than one window, are not scored. An end token counts as one
    character (the newline it stands for), as in document_rows and training's characters per token."""
    n = (len(stream) - 1) // context
    n = min(n, max_rows) if max_rows else n
    if n < 1:
        raise CorpusError(f"the validation split (the last 10% of the corpus) has {len(stream)} tokens, too few for "
                          f"one window of --context-length {context}; use more text or a shorter context")
    t = torch.from_numpy(stream[: n * context + 1].astype(np.int64))
    x, y = t[:-1].view(n, context), t[1:].view(n, context)
    targets = y.flatten().tolist()
    ends = targets.count(tokenizer.eot_id)
    n_chars = len(tokenizer.decode([t for t in targets if t != tokenizer.eot_id])) + ends
    return EvalSet(x, y, n_chars)


def split_text_corpus(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Train on the first 90% of a plain text file and validate on the rest, cut at a line break."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > len(text) // 2 else cut
    return text[:cut], text[cut:]
