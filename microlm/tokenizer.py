"""Byte-level BPE, trained here, served through `tiktoken`.

Training (`train_bpe`) is the textbook algorithm: split the text on special tokens, cut each piece
into words with a GPT-4 style regex, start from the 256 single bytes, and repeatedly merge the most
frequent adjacent pair of tokens into a new token. The result is a list of byte strings in merge
order, which is exactly what `tiktoken.Encoding` calls *mergeable ranks*: tiktoken then does all
encoding and decoding, in Rust, by merging within each word the pair whose merged bytes have the
lowest rank. `encode_python` is that same algorithm in plain Python, for teaching and for comparing.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import regex  # installed with tiktoken (a dependency of it); needed for \p{L} in the split pattern
import tiktoken

EOT = "<|endoftext|>"

# The cl100k (GPT-4) pre-tokenization pattern: contractions, words with one leading non-letter
# (usually a space), numbers of 1-3 digits, punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)


class TokenizerFileError(ValueError):
    """A tokenizer file that is missing, truncated or of another kind."""


class TokenizerUnavailable(RuntimeError):
    """A stock tiktoken encoding that would need a download."""


@dataclass
class BPEResult:
    mergeable_ranks: dict[bytes, int]  # token bytes -> rank (= token id); ranks 0..255 are the bytes
    special_tokens: dict[str, int]  # ids after the last rank
    pattern: str
    merges_requested: int
    merges_done: int

    @property
    def stopped_early(self) -> bool:
        return self.merges_done < self.merges_requested


def train_bpe(text: str, vocab_size: int, special_tokens=(EOT,), pattern: str = SPLIT_PATTERN) -> BPEResult:
    """Learn vocab_size - 256 - len(special_tokens) merges from `text`. Deterministic: the most frequent
    pair wins, ties go to the lexicographically greatest pair of byte strings."""
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (256 bytes + {len(special_tokens)} special), got {vocab_size}")
    n_merges = vocab_size - minimum

    # Count each distinct word once: the merges only depend on words and their frequencies.
    counts: collections.Counter[str] = collections.Counter()
    pieces = re.split("|".join(map(re.escape, special_tokens)), text) if special_tokens else [text]
    for piece in pieces:
        counts.update(regex.findall(pattern, piece))
    words = [list(w.encode("utf-8")) for w in counts]
    freq = list(counts.values())
    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes
    ids_of = {b: i for i, b in enumerate(vocab)}

    pair_count: collections.Counter[tuple[int, int]] = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words that contain it
    for w, (word, f) in enumerate(zip(words, freq)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += f
            where[pair].add(w)

    merges_done = 0
    while merges_done < n_merges and pair_count:
        top = max(pair_count.values())
        a, b = max((p for p, c in pair_count.items() if c == top), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merged = vocab[a] + vocab[b]
        # tiktoken names tokens by their bytes: if another pair already made these bytes (say
        # "a"+"bc" after "ab"+"c"), reuse that token rather than add a duplicate rank.
        new = ids_of.get(merged)
        if new is None:
            new = ids_of[merged] = len(vocab)
            vocab.append(merged)
            merges_done += 1
        for w in list(where[(a, b)]):
            word, f = words[w], freq[w]
            for pair in zip(word, word[1:]):  # retract this word's pairs, re-add them after merging
                pair_count[pair] -= f
                if pair_count[pair] == 0:
                    del pair_count[pair]
                where[pair].discard(w)
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
            for pair in zip(out, out[1:]):
                pair_count[pair] += f
                where[pair].add(w)
        where.pop((a, b), None)

    ranks = {tok: i for i, tok in enumerate(vocab)}
    specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
    return BPEResult(ranks, specials, pattern, n_merges, merges_done)


def encode_python(text: str, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> list[int]:
    """What tiktoken does, in plain Python: per word, merge the adjacent pair with the lowest rank."""
    ids = []
    for word in regex.findall(pattern, text):
        parts = [bytes([c]) for c in word.encode("utf-8")]
        while len(parts) > 1:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
            best = min((r, i) for i, r in enumerate(pair_ranks) if r is not None) if any(
                r is not None for r in pair_ranks) else None
            if best is None:
                break
            i = best[1]
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


class Tokenizer:
    """A `tiktoken.Encoding` plus the few things microlm needs: the end token, saving and loading."""

    FORMAT = "microlm-tokenizer"

    def __init__(self, encoding: tiktoken.Encoding, ranks: dict[bytes, int] | None = None):
        self.encoding = encoding
        self.ranks = ranks  # kept to save the file (None for a stock encoding)

    @classmethod
    def from_bpe(cls, result: BPEResult, name: str = "microlm") -> "Tokenizer":
        enc = tiktoken.Encoding(name=name, pat_str=result.pattern, mergeable_ranks=result.mergeable_ranks,
                                special_tokens=result.special_tokens)
        return cls(enc, result.mergeable_ranks)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    @property
    def name(self) -> str:
        return self.encoding.name

    def encode(self, text: str) -> list[int]:
        """Special-token text (e.g. '<|endoftext|>') becomes the special token."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """All text is plain text, special-token look-alikes included."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def save(self, path: str | Path) -> None:
        if self.ranks is None:
            raise ValueError("a stock tiktoken encoding is not saved by microlm; it is loaded by name")
        tokens = sorted(self.ranks, key=self.ranks.get)
        obj = {"format": self.FORMAT, "version": 1, "name": self.name, "pattern": self.encoding._pat_str,
               "special_tokens": self.encoding._special_tokens,
               "tokens": [base64.b64encode(t).decode("ascii") for t in tokens]}
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerFileError(f"{path}: tokenizer file not found; `make pretrain` (or `microlm pretrain`) "
                                     "trains one and writes it into the run folder")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if obj.get("format") != cls.FORMAT:
                raise ValueError(f"format is {obj.get('format')!r}, expected {cls.FORMAT!r}")
            tokens = [base64.b64decode(t, validate=True) for t in obj["tokens"]]
            ranks = {t: i for i, t in enumerate(tokens)}
            if len(ranks) != len(tokens) or tokens[:256] != [bytes([i]) for i in range(256)]:
                raise ValueError("the token list must start with the 256 bytes and hold no duplicates")
            specials = {str(k): int(v) for k, v in obj["special_tokens"].items()}
            if sorted(specials.values()) != list(range(len(tokens), len(tokens) + len(specials))):
                raise ValueError("special token ids must follow the mergeable tokens")
            enc = tiktoken.Encoding(name=obj["name"], pat_str=obj["pattern"], mergeable_ranks=ranks,
                                    special_tokens=specials)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise TokenizerFileError(f"{path}: not a valid microlm tokenizer file ({what}); it may be truncated "
                                     "or of another kind. Re-run `microlm pretrain` to write a new one") from None
        return cls(enc, ranks)

    @classmethod
    def stock(cls, name: str = "gpt2") -> "Tokenizer":
        """tiktoken's own 'gpt2' encoding, only if it is already in tiktoken's cache: never downloads."""
        blobs = _STOCK_BLOBS.get(name)
        if blobs is None:
            raise TokenizerUnavailable(f"stock encoding {name!r} is not supported; supported: {sorted(_STOCK_BLOBS)}")
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
            tempfile.gettempdir(), "data-gym-cache")
        missing = [b for b in blobs if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(b.encode()).hexdigest()))]
        if missing:
            raise TokenizerUnavailable(
                f"the stock {name!r} encoding is not in tiktoken's cache ({cache_dir}) and microlm never downloads "
                f"at run time. Use the tokenizer microlm trains (the default), or, on a machine with internet, run "
                f"`python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"` once and point TIKTOKEN_CACHE_DIR "
                "at that cache")
        return cls(tiktoken.get_encoding(name))


# The files tiktoken fetches for each stock encoding (tiktoken_ext/openai_public.py); the cache key
# is the sha1 of the address.
_STOCK_BLOBS = {
    "gpt2": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"),
}
