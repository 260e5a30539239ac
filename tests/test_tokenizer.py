"""BPE training, the tiktoken encoding built from it, and the tokenizer file."""

import collections
import json

import pytest
import regex
import tiktoken.load
from hypothesis import given, settings, strategies as st

from microlm.tokenizer import (EOT, SPLIT_PATTERN, Tokenizer, TokenizerFileError, TokenizerUnavailable,
                               count_words, encode_python, train_bpe)

TEXT = ("the cat sat on the mat. the dog sat on the log. " * 20
        + "Ann gives the red ball to Tom. She goes to the park. Tom takes the cup from Mia. " * 20
        + "naïve café — 数字 123 4567 ¿qué? don't we'll\n\n  tabs\tand spaces  🙂🙂 " * 5)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_bpe(train_bpe(TEXT, 400))


def merges(result):
    """The learned tokens in merge order."""
    return sorted((t for t in result.mergeable_ranks if len(t) > 1), key=result.mergeable_ranks.get)


def train_naively(text, n_merges):
    """Textbook BPE that recounts every pair from scratch after each merge: slow, obviously right."""
    words = {tuple(bytes([c]) for c in w.encode()): f for w, f in count_words(text, (), SPLIT_PATTERN).items()}
    learned = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, f in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += f
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))  # count, then left bytes, then right bytes
        learned.append(a + b)
        new_words = collections.Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = new_words
    return learned


@pytest.mark.parametrize("text, words", [
    ("Tom's cat, 12345 naps.\n\nThe end", ["Tom", "'s", " cat", ",", " ", "123", "45", " naps", ".\n\n", "The", " end"]),
    ("  x", ["  ", "x"]),  # a run of spaces is a word of its own (GPT-4's look-ahead would give " ", " x")
    ("a \n\tb  ", ["a", " \n", "\tb", "  "]),
])
def test_split_pattern_words(text, words):
    assert regex.findall(SPLIT_PATTERN, text) == words


def test_split_pattern_needs_no_backtracking_engine():
    """No look-around or possessive quantifier: tiktoken then runs it on Rust's fast `regex` engine."""
    assert not regex.search(r"\(\?<?[=!]|[+*?]\+|\{\d+(,\d*)?\}\+", SPLIT_PATTERN)


def test_classic_example_pins_the_first_merges():
    # "aaabdaaabac": aa (4) first; then aa+a and a+b tie at 2 and b"aa" > b"a" picks aa+a (Wikipedia's
    # hand-worked version picks a+b: tie-breaking is a choice); then aaa+b (2); then four pairs tie
    # at 1 and the greatest left side, b"d", wins.
    result = train_bpe("aaabdaaabac", 256 + 4, special_tokens=())
    assert merges(result) == [b"aa", b"aaa", b"aaab", b"daaab"]


def test_a_higher_count_beats_the_tie_break():
    # within words, (a, a) occurs 6 times, (a, b) twice, (a, c) once, (" ", a) twice
    assert merges(train_bpe("aaab aaab aaac", 256 + 1 + 1))[0] == b"aa"


def test_ties_go_to_the_lexicographically_greatest_pair():
    # (a, b), (" ", c) and (c, d) all occur twice: the greatest left side wins ...
    assert merges(train_bpe("ab cd ab cd", 258)) == [b"cd"]
    # ... and with equal left sides the greatest right side wins
    assert merges(train_bpe("ab ac", 258)) == [b"ac"]


def test_incremental_pair_counts_match_recounting_from_scratch():
    result = train_bpe(TEXT, 256 + 150, special_tokens=())
    assert merges(result) == train_naively(TEXT, 150)


def test_special_tokens_are_never_merged_or_split():
    text = EOT.join(["the cat sat"] * 200)
    result = train_bpe(text, 300)
    assert not any(b"<|" in t or b"|>" in t or b"endoftext" in t for t in result.mergeable_ranks)
    assert result.special_tokens == {EOT: len(result.mergeable_ranks)}  # right after the last merge
    tok = Tokenizer.from_bpe(result)
    ids = tok.encode(text + EOT)
    assert ids.count(tok.eot_id) == 200 and tok.decode(ids) == text + EOT
    assert tok.eot_id not in tok.encode_ordinary(EOT)  # plain text spells it out
    # the check above means something: without the special token, its text is learned
    assert any(b"endoftext" in t for t in train_bpe(text, 300, special_tokens=()).mergeable_ranks)


def test_training_stops_early_and_says_so():
    result = train_bpe("ab ab ab", 1000)
    assert result.stopped_early and result.merges_done == 2 < result.merges_requested == 1000 - 257
    assert Tokenizer.from_bpe(result).n_vocab == 256 + 2 + 1
    full = train_bpe(TEXT, 300)
    assert not full.stopped_early and Tokenizer.from_bpe(full).n_vocab == 300


def test_training_is_deterministic():
    assert train_bpe(TEXT, 350).mergeable_ranks == train_bpe(TEXT, 350).mergeable_ranks


def test_tiktoken_and_plain_python_encoders_agree(tok):
    text = TEXT + TEXT[::-1] + "The naïve cats' 2024 tab\tcafé!?\r\n  x" + "".join(map(chr, range(32, 600)))
    ids = tok.encode_ordinary(text)
    assert ids == encode_python(text, tok.ranks)
    assert len(ids) < 0.75 * len(text.encode())  # merges were used, so agreeing is not trivial


def test_encode_batch_encodes_each_text_as_plain_text(tok):
    texts = [TEXT[:200], "", "a <|endoftext|> look-alike stays text", TEXT[::-1][:300]]
    assert tok.encode_batch(texts) == [tok.encode_ordinary(t) for t in texts]
    assert tok.encode_batch(texts) == tok.encoding.encode_ordinary_batch(texts)  # tiktoken's threaded version
    assert tok.eot_id not in tok.encode_batch(texts)[2]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_plain_text_round_trips(tok, s):
    assert tok.decode(tok.encode_ordinary(s)) == s
    assert tok.decode_bytes(tok.encode_ordinary(s)) == s.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(), max_size=5))
def test_text_with_special_tokens_round_trips(tok, parts):
    s = EOT.join(parts)
    ids = tok.encode(s)
    assert tok.decode(ids) == s and ids.count(tok.eot_id) == s.count(EOT)


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left
    assert json.loads(path.read_text())["format"] == "microlm-tokenizer"
    again = Tokenizer.load(path)
    assert again.encode(TEXT + EOT) == tok.encode(TEXT + EOT)
    assert (again.n_vocab, again.eot_id, again.name, again.ranks) == (tok.n_vocab, tok.eot_id, tok.name, tok.ranks)


def test_a_missing_tokenizer_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*microlm pretrain"):
        Tokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize("damage", ["truncated", "not json", "other format", "missing key", "duplicate token",
                                    "bad special id", "not base64", "empty special token", "empty merged token",
                                    "deeply nested"])
def test_a_bad_tokenizer_file_names_the_file_and_the_problem(tok, tmp_path, damage):
    tok.save(tmp_path / "good.json")
    text = (tmp_path / "good.json").read_text()
    obj = json.loads(text)
    if damage == "truncated":
        text, problem = text[:200], "not a usable"
    elif damage == "not json":
        text, problem = "\x00\x01 binary", "not a usable"
    elif damage == "other format":
        obj["format"], problem = "something-else", "format"
    elif damage == "missing key":
        del obj["pattern"]
        problem = "missing keys.*pattern"
    elif damage == "duplicate token":
        obj["mergeable_ranks"].append(obj["mergeable_ranks"][-1])
        problem = "distinct"
    elif damage == "bad special id":
        obj["special_tokens"][EOT] += 5
        problem = "special token ids"
    elif damage == "empty special token":  # would match between every two characters: encode never ended
        obj["special_tokens"][""] = len(obj["mergeable_ranks"]) + 1
        problem = "non-empty strings"
    elif damage == "empty merged token":
        obj["mergeable_ranks"][300], problem = "", "two bytes or more"
    elif damage == "deeply nested":
        text, problem = "[" * 100_000 + "]" * 100_000, "not a usable"
    else:
        obj["mergeable_ranks"][300], problem = "not base64!", "not a usable"
    bad = tmp_path / "bad.json"
    bad.write_text(text if damage in ("truncated", "not json", "deeply nested") else json.dumps(obj))
    with pytest.raises(TokenizerFileError, match=f"bad\\.json.*{problem}"):
        Tokenizer.load(bad)


def test_vocab_size_too_small_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_bpe("abc", 256)
    assert train_bpe("abc", 257).merges_requested == 0  # the smallest valid size: bytes + <|endoftext|>


@pytest.mark.parametrize("cache_dir", ["empty folder", ""])
def test_stock_encoding_that_is_not_cached_fails_with_advice(tmp_path, monkeypatch, cache_dir):
    def no_network(url):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)  # a slip would fail loudly, not go online
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path) if cache_dir else "")
    with pytest.raises(TokenizerUnavailable, match="never downloads.*tokenizer microlm trains") as info:
        Tokenizer.stock("gpt2")
    assert (str(tmp_path) in str(info.value)) == bool(cache_dir)


def test_stock_gpt2_when_cached():
    try:
        tok = Tokenizer.stock("gpt2")
    except TokenizerUnavailable:
        pytest.skip("gpt2 is not in tiktoken's cache on this machine")
    assert tok.eot_id == 50256 and tok.decode(tok.encode("hello world")) == "hello world"
