"""Byte-level BPE, trained here, served through `tiktoken`.

Training (`train_bpe`) is the textbook algorithm: split the text on the special tokens, cut each
piece into words with a GPT-4 style regex, start from the 256 single bytes, and repeatedly merge the
most frequent adjacent pair of tokens into a new token. The result is a list of byte strings in merge
order, which is exactly what `tiktoken.Encoding` calls *mergeable ranks*: tiktoken then does all
encoding and decoding, in Rust, by merging within each word the pair whose merged bytes have the
lowest rank. `encode_python` is that same algorithm in plain Python, for teaching and for comparing.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# `regex`, not `re`: the split pattern needs the Unicode classes \p{L} and \p{N}. It is safe to
# import because tiktoken itself requires it, so it is installed wherever tiktoken is.
import regex
import tiktoken

from .checkpoint import save_text

EOT = "<|endoftext|>"

# The pre-tokenization pattern: contractions, words with one leading non-letter (usually a space),
# numbers of 1-3 digits, punctuation runs, whitespace up to a newline, other whitespace runs. Merges
# never cross these word boundaries. It is GPT-4's (cl100k) pattern less its look-ahead `\s+(?!\S)`
# and possessive quantifiers: without them tiktoken runs it on Rust's fast `regex` engine instead of
# fancy-regex's backtracking one, 2.5x faster on the stories (README: Benchmarks). What it gives up:
# a run of spaces before a word is a word of its own ("  x" -> "  ", "x"), where GPT-4 leaves the
# last space to the word ("  x" -> " ", " x"). On the default stories and SFT set both patterns give
# the same tokens (checked when the pattern changed). Python's `regex` module (BPE training,
# encode_python) and tiktoken's Rust regex split text the same way wherever both know the characters;
# their Unicode tables are of different versions, so a letter or digit only the newer one knows (17,144
# letters with the versions installed when this was written) can split differently. The stories are ASCII.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+"""


class TokenizerFileError(ValueError):
    """A tokenizer file that is truncated, not JSON or of another kind."""


class TokenizerUnavailable(RuntimeError):
    """A stock tiktoken encoding that is not cached here and would need a download."""


@dataclass
class BPEResult:
    """What training learned (everything `tiktoken.Encoding` needs) and how far it got."""

    mergeable_ranks: dict[bytes, int]  # token bytes -> rank (= token id); ranks 0..255 are the bytes
    special_tokens: dict[str, int]  # special token text -> id; the ids follow the last rank
    pattern: str  # the pre-tokenization regex the ranks were trained with
    merges_requested: int
    merges_done: int

    @property
    def stopped_early(self) -> bool:
        """True when the text ran out of pairs before `merges_requested` merges were learned."""
        return self.merges_done < self.merges_requested


def count_words(text: str, special_tokens: Sequence[str], pattern: str) -> collections.Counter[str]:
    """Distinct words and their counts; special tokens are cut out first, so no merge spans one."""
    pieces = [text]
    if special_tokens:  # longest first, so a special token that contains another one wins
        pieces = re.split("|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True)), text)
    counts: collections.Counter[str] = collections.Counter()
    for piece in pieces:
        counts.update(regex.findall(pattern, piece))
    return counts


def merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
    """`word` with each (a, b), taken left to right without overlap, replaced by `new`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text: str, vocab_size: int, special_tokens: Sequence[str] = (EOT,),
              pattern: str = SPLIT_PATTERN) -> BPEResult:
    """Learn up to `vocab_size - 256 - len(special_tokens)` merges from `text`.

    Deterministic: each step merges the pair with the highest count; ties go to the lexicographically
    greatest (left bytes, right bytes). Stops early, and says so in the result, if no pair is left.
    """
    if isinstance(special_tokens, str) or not all(special_tokens) or len(set(special_tokens)) < len(special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, e.g. ({EOT!r},); got {special_tokens!r}")
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 byte tokens + {len(special_tokens)} "
                         f"special tokens), got {vocab_size}")
    n_merges = vocab_size - minimum

    # Merges depend only on the distinct words and their counts, not on where the words occur, so a
    # 10 MB text with few distinct words trains about as fast as a tiny one.
    counts = count_words(text, special_tokens, pattern)
    words, freq = [list(w.encode("utf-8")) for w in counts], list(counts.values())
    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes
    id_of = {tok: i for i, tok in enumerate(vocab)}

    # pair -> occurrences (weighted by word count), and pair -> the words that hold it. A merge
    # changes only the words that hold the merged pair, so only they are counted again.
    pair_count: collections.Counter[tuple[int, int]] = collections.Counter()
    holders: dict[tuple[int, int], set[int]] = collections.defaultdict(set)

    def count_pairs(w: int, sign: int) -> None:
        """Add (sign=+1) or take back (sign=-1) the pairs of word number w."""
        for pair in zip(words[w], words[w][1:]):
            pair_count[pair] += sign * freq[w]
            if sign > 0:
                holders[pair].add(w)
            else:
                holders[pair].discard(w)
                if pair_count[pair] == 0:
                    del pair_count[pair]  # so an empty table means nothing is left to merge

    for w in range(len(words)):
        count_pairs(w, +1)
    merges_done = 0
    while merges_done < n_merges and pair_count:
        # This is max over (count, left bytes, right bytes), in two passes that build fewer tuples.
        top = max(pair_count.values())
        a, b = max((p for p, c in pair_count.items() if c == top), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        # tiktoken names a token by its bytes, so no two ranks may share bytes. Should another pair
        # already have made these bytes ("ab"+"c", then "a"+"bc"), the words are merged into that
        # token and no rank is added. (A random search never produced such a case; the guard is cheap.)
        merged = vocab[a] + vocab[b]
        new = id_of.get(merged)
        if new is None:
            new = id_of[merged] = len(vocab)
            vocab.append(merged)
            merges_done += 1
        for w in holders.pop((a, b)):
            count_pairs(w, -1)
            words[w] = merge_pair(words[w], a, b, new)
            count_pairs(w, +1)

    ranks = {tok: i for i, tok in enumerate(vocab)}
    specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
    return BPEResult(ranks, specials, pattern, n_merges, merges_done)


def encode_python(text: str, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> list[int]:
    """Ids of `text` as plain text, computed the way tiktoken does, in plain (slow) Python.

    Per word: a word that is itself a token is that token (tiktoken's shortcut); otherwise start from
    its bytes and keep merging the adjacent pair whose merged bytes have the lowest rank (leftmost
    on a tie) until no adjacent pair is a token. The same ids as tiktoken's wherever the two regex
    engines' Unicode tables agree (see SPLIT_PATTERN).
    """
    ids = []
    for word in regex.findall(pattern, text):
        word_bytes = word.encode("utf-8")
        parts = [word_bytes] if word_bytes in ranks else [bytes([b]) for b in word_bytes]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


class Tokenizer:
    """A `tiktoken.Encoding`, which does all encoding and decoding, plus the end-of-text id and a file."""

    FORMAT, VERSION = "microlm-tokenizer", 1

    def __init__(self, encoding: tiktoken.Encoding, ranks: dict[bytes, int] | None = None, pattern: str = ""):
        self.encoding = encoding
        self.ranks, self.pattern = ranks, pattern  # kept to save the file; None for a stock encoding

    @classmethod
    def from_bpe(cls, result: BPEResult, name: str = "microlm") -> Tokenizer:
        encoding = tiktoken.Encoding(name=name, pat_str=result.pattern, mergeable_ranks=result.mergeable_ranks,
                                     special_tokens=result.special_tokens)
        return cls(encoding, result.mergeable_ranks, result.pattern)

    @property
    def name(self) -> str:
        return self.encoding.name

    @property
    def n_vocab(self) -> int:
        """Mergeable tokens + special tokens: the rows of the model's embedding."""
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return {s: self.encoding.encode_single_token(s) for s in sorted(self.encoding.special_tokens_set)}

    @property
    def eot_id(self) -> int:
        if EOT not in self.encoding.special_tokens_set:
            raise ValueError(f"tokenizer {self.name!r} has no {EOT} token; train it with special_tokens=({EOT!r},)")
        return self.encoding.encode_single_token(EOT)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token text such as '<|endoftext|>' becomes that special token."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` as plain text: special-token look-alikes are spelled in ordinary tokens."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_ordinary` of each text, one call after another. tiktoken's own encode_ordinary_batch
        hands the texts to a pool of threads, which costs more per text than a short story takes to
        encode: on the story corpus it ran at 3 to 5 MB/s, this loop at 20 to 35 (make bench has both)."""
        return [self.encoding.encode_ordinary(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes cut mid-character decode to U+FFFD."""
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def save(self, path: str | Path) -> None:
        """Write the JSON file atomically: a reader sees the old file or the new one, never half of one."""
        if self.ranks is None:  # a stock encoding: only its name is stored, tiktoken's cache holds the rest
            obj = {"format": self.FORMAT, "version": self.VERSION, "stock": self.name}
        else:
            tokens = sorted(self.ranks, key=self.ranks.__getitem__)
            obj = {"format": self.FORMAT, "version": self.VERSION, "name": self.name, "pattern": self.pattern,
                   "special_tokens": self.special_tokens,
                   "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t in tokens]}  # list index = rank
        save_text(path, json.dumps(obj, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file here. `make pretrain` (or `microlm pretrain`) "
                                    "trains one and writes it as tokenizer.json in the run folder")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(obj, dict) or (obj.get("format"), obj.get("version")) != (cls.FORMAT, cls.VERSION):
                found = (obj.get("format"), obj.get("version")) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"expected format {cls.FORMAT!r} version {cls.VERSION}, found {found}")
            if "stock" in obj:
                try:
                    return cls.stock(str(obj["stock"]))
                except TokenizerUnavailable as e:
                    raise TokenizerUnavailable(f"{path}: {e}") from None
            if missing := [k for k in ("name", "pattern", "special_tokens", "mergeable_ranks") if k not in obj]:
                raise ValueError(f"missing keys {missing}")
            if not isinstance(obj["name"], str) or not isinstance(obj["pattern"], str):
                raise ValueError("name and pattern must be strings")
            tokens = [base64.b64decode(t, validate=True) for t in obj["mergeable_ranks"]]
            ranks = {t: i for i, t in enumerate(tokens)}
            if (tokens[:256] != [bytes([i]) for i in range(256)] or len(ranks) != len(tokens)
                    or any(len(t) < 2 for t in tokens[256:])):
                raise ValueError("mergeable_ranks must be the 256 single bytes in order, then distinct merged tokens "
                                 "of two bytes or more")
            specials = obj["special_tokens"]
            if not all(isinstance(k, str) and k for k in specials):  # an empty one would match everywhere
                raise ValueError(f"special tokens must be non-empty strings, got {sorted(specials)}")
            if sorted(specials.values()) != list(range(len(tokens), len(tokens) + len(specials))):
                raise ValueError(f"special token ids must follow the {len(tokens)} mergeable ranks, got {specials}")
            encoding = tiktoken.Encoding(name=obj["name"], pat_str=obj["pattern"], mergeable_ranks=ranks,
                                         special_tokens=specials)
            try:  # a pattern that can match empty text makes tiktoken's Rust code panic on the first encode
                encoding.encode_ordinary("Ann's 12 red cups, and Tom.\n  x\t!")
            except BaseException as e:  # pyo3's PanicException derives from BaseException, not Exception
                if type(e).__name__ != "PanicException":
                    raise
                raise ValueError(f"tiktoken cannot split text with the pattern {obj['pattern']!r} (does it match "
                                 "empty text?)") from None
        except (UnicodeDecodeError, ValueError, TypeError, AttributeError, RecursionError) as e:  # JSON, base64: ValueError
            raise TokenizerFileError(f"{path}: not a usable microlm tokenizer file ({e}). It may be truncated or "
                                     "of another kind; `microlm pretrain` writes a new one") from None
        return cls(encoding, ranks, obj["pattern"])

    @classmethod
    def stock(cls, name: str = "gpt2") -> Tokenizer:
        """tiktoken's own encoding `name`, only if tiktoken's cache already holds it: never downloads."""
        if name not in _STOCK_FILES:
            raise TokenizerUnavailable(f"stock encoding {name!r} is not supported; choose from {sorted(_STOCK_FILES)}")
        # As tiktoken/load.py does: the cache folder, each file named by the sha1 of its address, and a
        # download (which must not happen here) when a cached file is missing or fails its sha256.
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
            "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
        if cache_dir == "" or not all(_sha256(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())) == h
                                      for url, h in _STOCK_FILES[name].items()):
            where = f"in tiktoken's cache {cache_dir}" if cache_dir else "cached (TIKTOKEN_CACHE_DIR is empty)"
            raise TokenizerUnavailable(
                f"the stock {name!r} encoding needs a one-time download and is not {where}; microlm never "
                "downloads at run time. Use the tokenizer microlm trains (the default), or on a machine with "
                f"internet run `python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"` and point "
                "TIKTOKEN_CACHE_DIR at its cache")
        return cls(tiktoken.get_encoding(name))


# The files tiktoken downloads for each stock encoding, and their sha256 (tiktoken_ext/openai_public.py).
_STOCK_FILES = {"gpt2": {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}}


def _sha256(path: str) -> str | None:
    with contextlib.suppress(OSError):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return None
