"""Writes the teaching notebooks in notebooks/ from the cell lists in this file.

    python notebooks/build_notebooks.py                        # write the five notebooks, without outputs
    python notebooks/build_notebooks.py --execute              # write and run them in place (full setting)
    MICROLM_FAST=1 python notebooks/build_notebooks.py --execute            # the same in the fast setting
    python notebooks/build_notebooks.py --execute 03_pretraining            # only the named notebooks

The .ipynb files are this script's output: edit the cells here, not in Jupyter, and run it again
(tests/test_notebooks.py checks that the committed notebooks hold exactly these cells). Each notebook
runs in a fresh kernel of the Python that runs this script, so the venv's microlm and torch are the
ones used. With --execute a notebook is only written once it ran without an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent


def md(text: str) -> tuple[str, str]:
    return ("md", textwrap.dedent(text).strip())


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip())


# ---- shared cells ------------------------------------------------------------------------------

SETUP_MD = md(r"""
    ## Setup

    The first cell finds the repository (the folder that holds `pyproject.toml`) and makes it the
    working directory, so every path printed below is relative to it. It reads the setting:
    `MICROLM_FAST=1` shrinks every run so the notebook finishes in seconds (the test suite runs it
    that way; its numbers then mean little), otherwise the runs are the size the prose talks about.
    Anything the notebook writes goes under `runs/notebooks/`, which git ignores.
""")

SETUP = r"""
    import io
    import os
    import sys
    import warnings
    from pathlib import Path

    import matplotlib.pyplot as plt
    import torch
    from IPython.display import Image, display

    # microlm's training loop imports tqdm.auto, which warns in Jupyter when ipywidgets is missing;
    # these notebooks never draw progress bars, so the warning is noise.
    warnings.filterwarnings("ignore", message="IProgress not found")


    def find_repo_root(start: Path) -> Path:
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file() and (folder / "microlm").is_dir():
                return folder
        raise FileNotFoundError("open this notebook from inside the microlm checkout "
                                "(the folder that holds pyproject.toml)")


    ROOT = find_repo_root(Path.cwd().resolve())
    os.chdir(ROOT)                     # paths below are relative to the repository root
    sys.path.insert(0, str(ROOT))      # import microlm from this checkout
    FAST = os.environ.get("MICROLM_FAST") == "1"
    OUT = Path("runs/notebooks") / ("fast" if FAST else "full") / "NB_NAME"
    OUT.mkdir(parents=True, exist_ok=True)


    def show(fig):
        # Render the figure to PNG ourselves and display that: microlm.plots switches matplotlib to a
        # file-only backend when imported, after which Jupyter no longer displays figures by itself.
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        display(Image(data=buffer.getvalue()))


    torch.manual_seed(0)
    print("setting:", "fast (MICROLM_FAST=1): tiny runs, numbers for checking only" if FAST else "full")
"""

# Notebooks 4 and 5 start from a pretrained model: the one `make pretrain` wrote, or a small one
# trained here by the same command with smaller settings.
BASE_MD = md(r"""
    ## A pretrained base model

    LoRA adapts a model that is already trained. In the full setting this is `runs/pretrain`, the model
    `make pretrain` writes, if it is there. Otherwise (and always in the fast setting) the cell runs the
    very same command, `microlm pretrain`, with smaller settings, into this notebook's folder under
    `runs/notebooks/`: the numbers are then weaker, the mechanics identical. Its console output is
    printed below.
""")

BASE = r"""
    import subprocess

    from microlm.runs import load_run

    if FAST:
        BASE_FLAGS = ["--n-train", "300", "--n-val", "20", "--max-steps", "20", "--warmup-steps", "5",
                      "--eval-every", "10", "--batch-size", "8", "--d-model", "32", "--n-layers", "2",
                      "--n-heads", "2", "--n-samples", "0"]
    else:
        BASE_FLAGS = ["--n-train", "20000", "--n-val", "500", "--max-steps", "400", "--warmup-steps", "40",
                      "--eval-every", "100", "--n-samples", "50"]

    if not FAST and Path("runs/pretrain/model.safetensors").is_file():
        BASE = Path("runs/pretrain")
    else:
        BASE = OUT / "base"
        command = [sys.executable, "-m", "microlm.cli", "pretrain", "--run-dir", str(BASE),
                   "--data-dir", str(OUT / "data"), "--overwrite", "--no-progress", *BASE_FLAGS]
        done = subprocess.run(command, capture_output=True, text=True)
        print(done.stdout + done.stderr)
        assert done.returncode == 0, "microlm pretrain failed (its output is above)"
    base_model, tok, base_config = load_run(BASE)
    print(f"base model: {BASE}  ({sum(p.numel() for p in base_model.parameters()):,} parameters, "
          f"vocabulary {tok.n_vocab}, d_model {base_model.config.d_model}, {base_model.config.n_layers} layers)")
"""


# ---- 1. the tokenizer --------------------------------------------------------------------------

TOKENIZER = [
    md(r"""
    # 1. The story world and the tokenizer

    microlm learns from stories written by a small program, the *story world*. We look at that world
    first, because it gives us something a real corpus never does: the exact probability of every
    text, and with it the best loss that *any* model could reach. Then we build the tokenizer that
    turns stories into the integers a model reads: byte-level BPE, first by hand on a tiny text (and
    checked against `microlm.tokenizer.train_bpe`), then trained on the corpus and served by `tiktoken`.

    Every story and number below is computed when the notebook runs; none is typed in.
    """),
    SETUP_MD,
    code(SETUP),
    md(r"""
    ## The story world

    A story is written by one function that makes random choices as it goes: who the cast are and what
    each of them holds (everyone starts at home), then one event after another, and after each event
    whether to stop. Every choice is uniform over the options that are allowed *at that moment* (nobody can
    hand over an object they do not hold), except the decision to stop, which is a biased coin.
    Because the program knows the probability of each choice it makes, it knows the probability of
    the whole story: the product of the probabilities of its choices.
    """),
    code(r"""
    import math
    import random

    from microlm.world import InvalidStory, World, entropy_stats, generate_splits, log_prob, parse, render, sample_story

    world = World()
    print(f"{len(world.names)} names (the places are the cast's houses), {len(world.colours)} colours, "
          f"{len(world.kinds)} kinds of object; {world.cast_size} people per story; "
          f"the story stops after each event with probability {world.stop_prob}")
    rng = random.Random(0)
    for _ in range(3):
        story = sample_story(world, rng)
        print(f"\n{story.bits:5.1f} bits, {story.n_chars} characters:\n{story.text}")
    """),
    md(r"""
    The `bits` of a story is $-\log_2 p(\text{story})$: how many yes/no questions an ideal code needs to
    single this story out among all the stories the world can tell. Longer stories hold more choices,
    so they cost more bits.

    ## Reading a story back

    The same program can also be driven by a given text instead of a random number generator: at each
    choice it looks for the one option that the text continues with. That is `parse`. It returns the
    list of choices and the state at the end (who holds what, who is where). The options at every
    choice are written so that at most one can match, so a text has at most one parse, and
    `log_prob(text)` equals the log-probability the sampler added up while writing it. `render` goes
    the other way, from choices to text.
    """),
    code(r"""
    story = sample_story(world, random.Random(1))
    choices, state = parse(world, story.text)
    print(f"{len(choices)} choices: {choices}")
    print("at the end, who holds which object:", state.holder)
    print("and where everyone is:", state.place_of)

    assert math.isclose(log_prob(world, story.text), story.log_prob, rel_tol=1e-12)
    assert render(world, choices).text == story.text
    print(f"log p = {story.log_prob:.4f} nats, from the sampler and from the parser alike")
    """),
    md(r"""
    A text that breaks the world's rules has no parse. Below, the same story is cut off in the middle
    of a word: no option matches there, so its probability is zero ($\log p = -\infty$), and `parse`
    reports the character where reading failed and what it expected instead. Samples from a trained
    model are scored exactly like this in notebook 3: valid or not, and if not, where they go wrong.
    """),
    code(r"""
    cut = len(story.text) // 2
    while not (story.text[cut - 1].isalpha() and story.text[cut].isalpha()):
        cut += 1  # move the cut inside a word
    broken = story.text[:cut]
    print("the text ends with:", repr(broken[-40:]))
    print("log p =", log_prob(world, broken))
    try:
        parse(world, broken)
    except InvalidStory as e:
        print(e)
    """),
    md(r"""
    ## The exact entropy: the best loss any model can reach

    `generate_splits` draws stories with a fixed seed and deals each one to a split by a hash of its
    text. Equal texts always land in the same split, so the training and validation sets cannot share
    a story.

    For any model $q$, the cross-entropy on stories drawn from the world, $-\mathbb{E}\log_2 q(\text{story})$,
    is at least the entropy $-\mathbb{E}\log_2 p(\text{story})$, with equality only when $q = p$
    (Gibbs' inequality). On a finite validation set, the mean of $-\log_2 p$ over its stories estimates
    that entropy: the bound holds in expectation, and on one set of stories a model could land a
    little below it by chance (by about the standard error of that mean). Divided by the number of characters, counting each story's final newline
    because a model has to predict where the story ends, it becomes **bits per character**: a unit
    that does not depend on the tokenizer, so any model can be measured against it. `entropy_stats`
    computes it; the cell checks it against the sum written out.
    """),
    code(r"""
    if FAST:
        N_TRAIN, N_VAL = 400, 100
    else:
        N_TRAIN, N_VAL = 20_000, 1_000
    splits = generate_splits(world, {"train": N_TRAIN, "val": N_VAL}, seed=1337)
    train_texts = [s.text for s in splits["train"]]
    val_texts = [s.text for s in splits["val"]]
    assert not set(train_texts) & set(val_texts)

    stats = entropy_stats(splits["val"])
    by_hand = sum(s.bits for s in splits["val"]) / sum(len(s.text) + 1 for s in splits["val"])
    assert math.isclose(stats["bits_per_char"], by_hand, rel_tol=1e-12)
    for name, value in stats.items():
        print(f"{name:15s} {value:,.4f}" if isinstance(value, float) else f"{name:15s} {value:,}")
    """),
    md(r"""
    The figure shows each validation story as a dot: its length in characters against its bits. The
    dashed line through the origin has the slope of the bound, the average bits per character. Total
    bits grow roughly in proportion to length, since every event is a few more choices. The spread
    around the line comes from the events themselves: some carry more choices per character than
    others, and the stop decisions add a little to every story.
    """),
    code(r"""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([s.n_chars for s in splits["val"]], [s.bits for s in splits["val"]], s=6, alpha=0.4)
    longest = max(s.n_chars for s in splits["val"])
    ax.plot([0, longest], [0, longest * stats["bits_per_char"]], "k--", lw=1,
            label=f"{stats['bits_per_char']:.4f} bits per character")
    ax.set_xlabel("characters in the story (newline included)")
    ax.set_ylabel("bits = -log2 p(story)")
    ax.set_title("Every validation story and its exact information content")
    ax.legend()
    ax.grid(alpha=0.3)
    show(fig)
    """),
    md(r"""
    ## Byte-pair encoding, by hand

    A model reads integers. Byte-level BPE starts from the 256 possible bytes, so that any text at all
    can be encoded, and then *learns merges*: it finds the most frequent pair of adjacent tokens in the
    training text and adds their concatenation to the vocabulary as a new token, again and again. Two
    details make it practical:

    * **Pre-tokenization.** The text is first cut into words by a regular expression (microlm uses
      GPT-4's pattern without its look-ahead; a word usually carries the space before it). Merges never
      cross a word boundary, so all the algorithm needs is the list of distinct words and how often each
      occurs.
    * **Special tokens** such as `<|endoftext|>`, which separates documents, are cut out before
      counting, so no merge can swallow one.

    Our tiny text is a few training stories joined by `<|endoftext|>`. These are its words, most
    frequent first (`count_words` is the package's pre-tokenizer):
    """),
    code(r"""
    import collections

    from microlm.tokenizer import EOT, SPLIT_PATTERN, Tokenizer, count_words, encode_python, train_bpe

    tiny_text = EOT.join(train_texts[:4])
    word_counts = count_words(tiny_text, [EOT], SPLIT_PATTERN)
    print(f"{len(tiny_text)} characters, {sum(word_counts.values())} words, {len(word_counts)} distinct")
    print(word_counts.most_common(12))
    """),
    md(r"""
    The function below is the whole algorithm. A token is a `bytes` object and a word is a tuple of
    tokens, starting as single bytes. Each step counts every adjacent pair in every word, weighted by
    how often the word occurs, picks the most frequent pair, and replaces it by the merged token in
    every word. When two pairs are equally frequent we take the one whose bytes compare greater: any
    fixed rule would do, but it has to be the package's rule for the two results to match.
    """),
    code(r"""
    def merge_in_word(word, a, b):
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                out.append(a + b)  # bytes + bytes: the merged token
                i += 2
            else:
                out.append(word[i])
                i += 1
        return tuple(out)


    def bpe_by_hand(word_counts, n_merges, show_steps=0):
        words = {tuple(bytes([b]) for b in w.encode("utf-8")): n for w, n in word_counts.items()}
        merges = []
        while len(merges) < n_merges:
            pairs = collections.Counter()
            for word, n in words.items():
                for pair in zip(word, word[1:]):
                    pairs[pair] += n
            if not pairs:
                break  # every word is a single token: nothing left to merge
            a, b = max(pairs, key=lambda p: (pairs[p], p[0], p[1]))
            if len(merges) < show_steps:
                print(f"merge {len(merges) + 1:2d}: {a!r:>10} + {b!r:<10} -> {a + b!r:<16} ({pairs[a, b]} times)")
            words = {merge_in_word(w, a, b): n for w, n in words.items()}
            if a + b not in merges:  # the same bytes reached by another pair are not a new token
                merges.append(a + b)
        return merges


    N_MERGES = 40
    merges_by_hand = bpe_by_hand(word_counts, N_MERGES, show_steps=15)
    print(f"... {len(merges_by_hand)} merges in all; the last ones: {merges_by_hand[-4:]}")
    """),
    md(r"""
    The first merges join the most common byte pairs (often a space and the letter after it), and
    soon whole words appear as single tokens. The package's `train_bpe` runs the same loop faster: it
    keeps the pair counts from one step to the next and recounts only the words a merge changed. Its
    result is the list of tokens in the order they were learned; a token's position in that list is
    its *rank*, and the 256 single bytes come first. Learning 40 merges needs a vocabulary of
    256 + 40 + 1 (the special token). Both must agree exactly:
    """),
    code(r"""
    result = train_bpe(tiny_text, vocab_size=256 + N_MERGES + 1, special_tokens=[EOT])
    learned = sorted((t for t, rank in result.mergeable_ranks.items() if rank >= 256), key=result.mergeable_ranks.get)
    assert learned == merges_by_hand, "the hand-written BPE and train_bpe disagree"
    print(f"train_bpe learned the same {len(learned)} merges in the same order; "
          f"special tokens: {result.special_tokens}")
    """),
    md(r"""
    ## The tokenizer of the corpus

    Now we train on the whole training split, asking for 512 tokens (the 256 bytes, the merges, and
    `<|endoftext|>`). The story world has a small vocabulary of words, and once every word has become a
    single token no pair is left to merge: training stops early and says so.

    The learned ranks go into a `tiktoken.Encoding`, which encodes and decodes in Rust. tiktoken
    applies merges by rank: within each word, it keeps merging the adjacent pair whose concatenation
    has the lowest rank. `encode_python` is that same rule in plain Python; the cell checks that it
    agrees with tiktoken on every validation story.
    """),
    code(r"""
    bpe = train_bpe(EOT.join(train_texts), vocab_size=512)
    print(f"merges: {bpe.merges_done} of {bpe.merges_requested} requested; stopped early: {bpe.stopped_early}")
    tok = Tokenizer.from_bpe(bpe)
    print(f"{type(tok.encoding).__module__}.{type(tok.encoding).__name__} with {tok.n_vocab} tokens; "
          f"<|endoftext|> is id {tok.eot_id}")

    for text in val_texts:
        assert encode_python(text, bpe.mergeable_ranks) == tok.encode_ordinary(text)
    print(f"encode_python == tiktoken on all {len(val_texts)} validation stories")
    """),
    md(r"""
    Here is a validation story cut into its tokens (a bar between tokens). Most words of the world
    have become one token each, space included. The last checks are the ones every tokenizer must pass:
    decoding the encoding gives back the text exactly, also for text the tokenizer never saw (falling
    back to bytes), and the end-of-text marker is one token only when it is meant as a special token;
    as ordinary text it is spelled out in ordinary tokens, so user text cannot forge it.
    """),
    code(r"""
    ids = tok.encode_ordinary(val_texts[0])
    print("|".join(tok.decode([i]) for i in ids))
    print(f"\n{len(val_texts[0])} characters -> {len(ids)} tokens")

    for text in (val_texts[0], "Ünïcödé, emoji 🙂 and digits 12345 are bytes too"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(EOT) == [tok.eot_id]
    assert len(tok.encode_ordinary(EOT)) > 1 and tok.decode(tok.encode_ordinary(EOT)) == EOT
    print("round trips hold; <|endoftext|> as plain text takes", len(tok.encode_ordinary(EOT)), "tokens")
    """),
    md(r"""
    ## Why tiktoken: the same merges, timed

    `encode_python` and tiktoken give the same ids, so the only difference is speed. Two parts of
    encoding take time: cutting the text into words with the split pattern, and merging each word's
    bytes. On the stories every word is already one token (both encoders take such a word whole), so
    only the split is left; on English prose, here this repository's README, most words are merged up
    from bytes, and the merge loop counts.

    The split pattern matters to tiktoken too. GPT-4's pattern has a look-ahead (`\s+(?!\S)`: leave
    the last space of a run to the next word) and possessive quantifiers, which Rust's linear-time
    `regex` engine cannot run, so tiktoken runs such a pattern on a slower backtracking engine.
    microlm's pattern drops them (a run of spaces before a word becomes a word of its own) and on the
    stories gives the same tokens. The cell times all three on one thread, medians of five runs:
    """),
    code(r"""
    import statistics
    import time

    import tiktoken


    def megabytes_per_second(encode, text, repeats=5):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            encode(text)
            times.append(time.perf_counter() - start)
        return len(text.encode("utf-8")) / 1e6 / statistics.median(times)


    GPT4_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"
                    r" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s")
    gpt4_split = tiktoken.Encoding(name="gpt4-split", pat_str=GPT4_PATTERN, mergeable_ranks=bpe.mergeable_ranks,
                                   special_tokens=bpe.special_tokens)
    stories = "\n".join(val_texts)
    prose = Path("README.md").read_text(encoding="utf-8")
    assert gpt4_split.encode_ordinary(stories) == tok.encode_ordinary(stories)  # same tokens on the stories
    assert encode_python(prose, bpe.mergeable_ranks) == tok.encode_ordinary(prose)
    for name, text in (("validation stories", stories), ("README prose", prose)):
        python = megabytes_per_second(lambda t: encode_python(t, bpe.mergeable_ranks), text)
        rust = megabytes_per_second(tok.encode_ordinary, text)
        rust_gpt4 = megabytes_per_second(gpt4_split.encode_ordinary, text)
        print(f"{name:18s} ({len(text) / 1e6:.2f} MB): plain Python {python:5.1f} MB/s, tiktoken {rust:5.1f} MB/s "
              f"({rust / python:.0f}x), tiktoken with GPT-4's pattern {rust_gpt4:5.1f} MB/s")
    """),
    md(r"""
    Both encoders spend most of their time on the stories in the split, so Rust wins there by less
    than on prose, where Python also runs its merge loop word by word. The GPT-4 pattern costs tiktoken
    a large part of its speed for no change in the tokens of this corpus. (On a busy machine single
    timings wander; `make bench` measures these figures side by side with their spread: README,
    Benchmarks.)
    """),
    md(r"""
    ## Vocabulary size against compression

    A larger vocabulary writes each story in fewer tokens: sequences get shorter, attention gets
    cheaper, and the model's context holds more text. The price is a larger embedding table, and each
    token is seen less often in training. The cell trains the tokenizer at several sizes and measures
    characters per token on the validation stories (each story's end token counts for its newline).
    """),
    code(r"""
    sweep_text = EOT.join(train_texts[:5000])
    sizes = [257, 264, 272, 288, 320, 352, 384, 448, 512]
    chars = sum(len(t) + 1 for t in val_texts)
    points = []
    for size in sizes:
        t = Tokenizer.from_bpe(train_bpe(sweep_text, vocab_size=size))
        tokens = sum(len(ids) + 1 for ids in t.encode_batch(val_texts))
        points.append((size, t.n_vocab, chars / tokens))
        print(f"vocab_size {size:4d}: {t.n_vocab:4d} tokens learned, {chars / tokens:.2f} characters per token")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-")
    ax.set_xlabel("vocabulary size (tokens actually learned)")
    ax.set_ylabel("characters per token (validation)")
    ax.set_title("Compression")
    ax.grid(alpha=0.3)
    bx.plot([p[1] for p in points], [p[1] * 128 for p in points], "o-", color="C1")
    bx.set_xlabel("vocabulary size")
    bx.set_ylabel("embedding parameters at d_model = 128")
    bx.set_title("Cost")
    bx.grid(alpha=0.3)
    show(fig)
    """),
    md(r"""
    With bytes only (257) every character is a token. The first merges pay off most: they join the
    pairs that occur everywhere, such as a space and a frequent letter. The curve then flattens, and
    where the merges run out it stops moving altogether: a larger request learns nothing more, because
    every word is already one token. The right panel is the cost: the embedding table grows linearly
    with the vocabulary (with tied embeddings the output layer reuses it). For this corpus a few
    hundred tokens is all BPE can use; microlm asks for 512 and keeps what the corpus supports.

    **Next:** notebook 2 builds the model that reads these tokens.
    """),
]


# ---- 2. the model ------------------------------------------------------------------------------

MODEL = [
    md(r"""
    # 2. The model

    This notebook takes microlm's GPT apart. For each piece (the embedding, RMSNorm, rotary position
    embeddings, causal self-attention, the SwiGLU feed-forward, the block, the whole model) it writes
    the formula out in a few lines of PyTorch and checks that the result equals what `microlm.model`
    computes. At the end it counts the parameters, component by component.

    The model is not trained here (that is notebook 3), so its weights are random. Every check below
    holds for any weights, which is exactly why random ones are a fair test.
    """),
    SETUP_MD,
    code(SETUP),
    md(r"""
    ## A tokenizer and a model

    A real story gives us real token ids, so we train a small tokenizer on a few hundred generated
    stories (notebook 1 explains how). The model uses the package's default configuration: width
    `d_model = 128`, 4 blocks, 4 attention heads of 32 channels, a context of 256 tokens. Two settings
    come from the tokenizer: the vocabulary size, and `eot_id`, the id of `<|endoftext|>`, which the
    model uses to keep attention inside one story (more on that below).
    """),
    code(r"""
    import math

    import torch.nn.functional as F

    from microlm.model import GPT, GPTConfig, RMSNorm, ShortConv, SwiGLU, apply_rope, rope_tables
    from microlm.tokenizer import EOT, Tokenizer, train_bpe
    from microlm.world import World, generate_splits

    stories = [s.text for s in generate_splits(World(), {"train": 300}, seed=0)["train"]]
    tok = Tokenizer.from_bpe(train_bpe(EOT.join(stories), vocab_size=512))
    config = GPTConfig(vocab_size=tok.n_vocab, eot_id=tok.eot_id)
    model = GPT(config).eval()
    print(config)

    ids = torch.tensor([[tok.eot_id] + tok.encode_ordinary(stories[0])])  # (batch 1, seq)
    T = ids.shape[1]
    print(f"\nOne story: {T} tokens, starting with <|endoftext|> as every document does")
    """),
    md(r"""
    ## Embeddings

    The first layer turns each token id into a vector of `d_model` numbers by looking up a row of a
    table: `tok_emb.weight`, of shape (vocabulary, d_model). A lookup is the same as multiplying a
    one-hot vector by the table, which is how it is usually drawn; the lookup is just much cheaper.
    The model *ties* its embeddings: the output layer `lm_head`, which turns the final vectors back
    into one score per token, uses the very same matrix. There are no position embeddings here:
    position enters later, inside attention (RoPE).
    """),
    code(r"""
    x = model.tok_emb(ids)                                         # (1, T, d_model)
    one_hot = F.one_hot(ids, config.vocab_size).float()            # (1, T, vocab)
    assert torch.equal(one_hot @ model.tok_emb.weight, x)
    assert model.lm_head.weight is model.tok_emb.weight
    print(f"embedded: {tuple(x.shape)}; the lookup equals one-hot @ table; lm_head shares the table")
    """),
    md(r"""
    ## RMSNorm

    Before each sub-layer the vector at every position is rescaled to unit root-mean-square and then
    multiplied channel by channel by a learned gain $g$:

    $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{d}\sum_i x_i^2 + \epsilon}} \odot g$$

    It is LayerNorm without subtracting the mean and without a bias: cheaper, and it works as well in
    practice. A fresh RMSNorm has $g = 1$, which would hide a missing gain, so the check uses random
    gains.
    """),
    code(r"""
    def rms_norm_by_hand(x, gain, eps):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

    norm = RMSNorm(config.d_model, config.norm_eps)
    torch.nn.init.normal_(norm.weight)
    diff = (rms_norm_by_hand(x, norm.weight, config.norm_eps) - norm(x)).abs().max().item()
    assert diff <= 1e-6, diff
    print(f"max |by hand - RMSNorm| = {diff:.1e} (tolerance 1e-6, fp32 rounding)")
    """),
    md(r"""
    ## Rotary position embeddings (RoPE)

    Attention compares a query $q$ at position $m$ with a key $k$ at position $n$ through their dot
    product. RoPE makes that dot product depend on the *distance* $m - n$ by rotating both vectors by
    an angle proportional to their position. The channels are taken in pairs, and each pair is a point
    in the plane that turns at its own speed: pair $i$ turns by $\theta_i = \text{base}^{-2i/d_{head}}$
    radians per position, so the first pairs spin fast and the last ones barely move.

    microlm pairs channel $i$ with channel $i + d_{head}/2$ (the "rotate half" layout). Treating each
    pair as a complex number $z = x_i + \mathrm{i}\,x_{i+d/2}$, the rotation at position $m$ is simply
    $z \cdot e^{\mathrm{i} m \theta_i}$. That is the hand version below; the package instead multiplies
    by precomputed cos and sin tables, which avoids complex numbers.
    """),
    code(r"""
    hd, half = config.head_dim, config.head_dim // 2
    theta = config.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)   # (hd/2,)


    def rope_by_hand(x, positions):
        # x: (..., seq, hd) -> the same, each channel pair (i, i + hd/2) turned by position * theta_i
        angle = positions.double()[:, None] * theta[None, :]                         # (seq, hd/2)
        z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1).float()


    cos, sin = rope_tables(hd, T, config.rope_base)                                  # (T, hd) each
    q = torch.randn(1, config.n_heads, T, hd)
    diff = (rope_by_hand(q, torch.arange(T)) - apply_rope(q, cos, sin)).abs().max().item()
    assert diff <= 1e-5, diff
    print(f"max |by hand - apply_rope| = {diff:.1e} (tolerance 1e-5: the hand version works in float64)")
    """),
    md(r"""
    The promise of RoPE, checked: the same query and key give the same score whenever their distance
    is the same, wherever they sit in the sequence.
    """),
    code(r"""
    q1, k1 = torch.randn(hd), torch.randn(hd)


    def score(m, n):
        qm = rope_by_hand(q1[None], torch.tensor([m]))[0]
        kn = rope_by_hand(k1[None], torch.tensor([n]))[0]
        return (qm @ kn).item()


    for m, n in [(3, 0), (10, 7), (100, 97), (250, 247)]:
        print(f"query at {m:3d}, key at {n:3d} (distance 3): score {score(m, n):+.5f}")
    assert all(abs(score(m, m - 3) - score(3, 0)) < 1e-4 for m in (10, 100, 250))
    """),
    md(r"""
    The left picture shows the rotation table: the cosine of the angle for every position (rows) and
    channel (columns). The first channel pairs turn so fast that they look like noise; the last ones
    change so slowly that they stay near 1 over the whole context. Between them, every distance up to
    the context length has some channels that resolve it. The right picture takes one vector as both
    query and key and plots their score against the distance: it is largest at distance 0, drops within
    a few positions as the fast channels turn out of line, and then wavers at a lower level, held up by
    the slow channels. Nearby tokens get a mild head start; learned queries and keys can override it.
    """),
    code(r"""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    image = ax.imshow(rope_tables(hd, config.context_length, config.rope_base)[0], aspect="auto",
                      cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("channel (pairs i and i + head_dim/2 share an angle)")
    ax.set_ylabel("position")
    ax.set_title("cos(position x theta_i)")
    fig.colorbar(image, ax=ax)
    v = torch.randn(hd)
    distances = torch.arange(config.context_length)
    rotated = rope_by_hand(v.expand(len(distances), hd), distances)                 # v at every position
    bx.plot(distances, (rotated @ v).numpy() / (v @ v).item())
    bx.set_xlabel("distance between query and key")
    bx.set_ylabel("score / score at distance 0")
    bx.set_title("Same vector as query and key")
    bx.grid(alpha=0.3)
    show(fig)
    """),
    md(r"""
    ## Causal self-attention, by hand

    Attention lets each position gather information from earlier positions. For every head:

    1. project the normalised input $h$ into queries, keys and values: $q = h W_q$, $k = h W_k$,
       $v = h W_v$ (`q_proj`, `k_proj`, `v_proj`; these are the layers LoRA adapts in notebook 4);
    2. normalise $q$ and $k$ per head (QK-norm: an RMSNorm over each head's channels, which keeps the
       scores in a usable range from the first step) and rotate them with RoPE;
    3. score every query against every key, $s \cdot q k^\top / \sqrt{d_{head}}$, and set the scores of
       *future* keys to $-\infty$, so a position never sees what comes after it. With QK-norm,
       $q k^\top / \sqrt{d_{head}}$ can be at most $\sqrt{d_{head}}$ times the norms' gains, too flat to
       single out one token of a story at first; microlm multiplies it by $s$ = `attn_scale` = 2;
    4. turn each row of scores into weights with a softmax, and average the values with them;
    5. put the heads side by side again and mix them with `output_proj`.

    The function below does exactly that with the weights of the model's first block, from the
    hand-written RMSNorm and RoPE above. It is compared with the package's `CausalSelfAttention`, and
    its masked softmax with PyTorch's fused `F.scaled_dot_product_attention` (which the package calls)
    on the same queries, keys and values.
    """),
    code(r"""
    def qkv_by_hand(attn, h, positions):
        # h: (batch, seq, d_model) -> q, k, v: (batch, heads, seq, head_dim), q and k normalised and rotated
        B, T, d = h.shape
        heads = lambda t: t.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)   # (B, H, T, hd)
        q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
        q = rope_by_hand(rms_norm_by_hand(q, attn.q_norm.weight, config.norm_eps), positions)
        k = rope_by_hand(rms_norm_by_hand(k, attn.k_norm.weight, config.norm_eps), positions)
        return q, k, v


    def attention_by_hand(attn, h, positions, mask=None):
        # h: (batch, seq, d_model); mask: (seq, seq) True where query i may see key j (default: causal)
        B, T, d = h.shape
        q, k, v = qkv_by_hand(attn, h, positions)
        scores = q @ k.transpose(-2, -1) * config.attn_scale / math.sqrt(attn.head_dim)  # (B, H, T, T)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool).tril()
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(B, T, d)                              # heads side by side
        return attn.output_proj(y), weights


    block = model.blocks[0]
    h = block.attn_norm(x)
    with torch.no_grad():
        mine, weights = attention_by_hand(block.attn, h, torch.arange(T))
        package = block.attn(h, cos, sin)
        # the fused kernel on the hand-made q, k, v: its masked softmax against the one written out above
        a = block.attn
        fused = F.scaled_dot_product_attention(*qkv_by_hand(a, h, torch.arange(T)), is_causal=True, scale=a.scale)
        fused = a.output_proj(fused.transpose(1, 2).reshape(1, T, config.d_model))

    TOL = 1e-6
    d1, d2 = (mine - package).abs().max().item(), (mine - fused).abs().max().item()
    print(f"max |by hand - CausalSelfAttention| = {d1:.1e}")
    print(f"max |by hand - F.scaled_dot_product_attention| = {d2:.1e}")
    print(f"(outputs are of size {package.abs().max().item():.1e}; tolerance {TOL:.0e})")
    assert d1 <= TOL and d2 <= TOL
    """),
    md(r"""
    The picture shows the attention weights of the four heads of that first block on the story: row
    $i$ is how position $i$ spreads its attention over positions $0 \ldots i$. Everything above the
    diagonal is exactly zero: that is the causal mask. With random weights the heads have not learned
    to look anywhere in particular, yet the rows are not flat: QK-norm gives every query and key unit
    RMS (a length of $\sqrt{d_{head}}$), so their scores $s \cdot q k^\top / \sqrt{d_{head}}$ vary by about
    $s$ = `attn_scale` = 2 (a standard deviation) even at random, and a softmax over such scores already favours a few keys of each row, just arbitrary
    ones. After training (notebook 3) heads pick out the tokens they need, such as the last mention
    of an object.
    """),
    code(r"""
    fig, axes = plt.subplots(1, config.n_heads, figsize=(13, 3.4))
    for head, ax in enumerate(axes):
        ax.imshow(weights[0, head], cmap="viridis")
        ax.set_title(f"head {head}")
        ax.set_xlabel("key position")
    axes[0].set_ylabel("query position")
    show(fig)
    """),
    md(r"""
    ## One story at a time: the document mask

    In training, stories are packed one after another into windows of 256 tokens, each story starting
    with `<|endoftext|>`. A story's probability under the world does not depend on the story before it,
    so the model should not look at it either. With `eot_id` set, the model builds a *document mask*:
    query $i$ may see key $j$ only if $j \le i$ **and** both lie in the same story. Counting the
    `<|endoftext|>` tokens up to each position numbers the stories; the mask compares those numbers.
    Note that the end token closing one story opens the next: it belongs to the next story, while
    *predicting* it is the last step of the previous one.
    """),
    code(r"""
    packed = torch.tensor([[tok.eot_id] + tok.encode_ordinary(stories[1])
                           + [tok.eot_id] + tok.encode_ordinary(stories[2])])
    story_number = (packed == tok.eot_id).cumsum(dim=1)[0]                            # (seq,)
    n = packed.shape[1]
    by_hand = (story_number[:, None] == story_number[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    package_mask = model.document_mask(packed)[0, 0]                                  # (seq, seq)
    assert torch.equal(by_hand, package_mask)

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.imshow(package_mask, cmap="Greys")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title("two packed stories: who may see whom")
    show(fig)
    """),
    md(r"""
    Two triangles instead of one: the second story's positions see only the second story. (Black is
    allowed, white is masked.)

    ## The feed-forward network: SwiGLU

    After attention has moved information between positions, a feed-forward network transforms each
    position on its own. microlm uses SwiGLU: two projections up to a hidden size $d_{ff}$, one passed
    through SiLU ($z \cdot \sigma(z)$) and used as a gate on the other, then a projection back down:

    $$\mathrm{SwiGLU}(x) = W_{down}\,\big(\mathrm{SiLU}(W_{gate}\,x) \odot W_{up}\,x\big)$$

    It has three matrices instead of the classic two, so $d_{ff}$ is about $\tfrac{8}{3} d_{model}$
    rather than $4 d_{model}$, which keeps the parameter count the same.
    """),
    code(r"""
    def swiglu_by_hand(mlp, x):
        gate = x @ mlp.gate_proj.weight.T
        return (gate * torch.sigmoid(gate) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T

    mlp = block.mlp
    assert isinstance(mlp, SwiGLU)
    with torch.no_grad():
        diff = (swiglu_by_hand(mlp, h) - mlp(h)).abs().max().item()
    assert diff <= 1e-6, diff
    print(f"d_ff = {config.d_ff}; max |by hand - SwiGLU| = {diff:.1e} (tolerance 1e-6)")
    """),
    md(r"""
    ## A short convolution: each position sees its neighbours

    To restate who holds the ball (`The ball passes from` ...), attention has to find the word where the
    ball last changed hands (`... to Ann`), and it finds a position by what is written *at* it. A bare
    `Ann` says nothing about the ball; only an earlier attention layer could copy that in from the words
    before it. microlm can give every position its neighbours directly: before attention and before the
    feed-forward, a `ShortConv` adds a weighted sum of the last $k$ inputs, channel by channel
    (`GPTConfig.conv_kernel` = $k$; `microlm pretrain --conv-kernel 4`):

    $$y_t = h_t + \sum_{i=0}^{k-1} w_i \odot h_{t-(k-1-i)}$$

    ($w_{k-1}$ meets the position itself and $w_0$ the oldest one, in the order of `F.conv1d`'s taps).

    The weights start at zero, so a new model is a plain transformer; training decides how much of the
    neighbours to mix in. On this story world, with $k = 8$, all four training seeds tried wrote 97.5%
    to 99.5% valid stories, where the plain model reached the 95% target on one seed of four (87.5% on
    the worst); but training took 12% longer, close to the 10 minutes `make pretrain` has, so it is
    still off by default (`conv_kernel = 0`, the model above; results/HISTORY.md has the runs). Inputs
    before the start of a story count as zero, as the document mask asks: packed stories still cannot
    see each other. Below, a ShortConv with random weights (zeros would check nothing) against the
    formula written out.
    """),
    code(r"""
    def short_conv_by_hand(conv, h):
        # h: (batch, seq, d_model); y_t = h_t + sum_i w_i * h_(t-(k-1-i)), with h before position 0 taken as 0
        k = conv.weight.shape[0]
        y = h.clone()
        for t in range(h.shape[1]):
            for i in range(k):
                if t - (k - 1 - i) >= 0:
                    y[:, t] += conv.weight[i] * h[:, t - (k - 1 - i)]
        return y


    conv = ShortConv(config.d_model, kernel=4)
    torch.nn.init.normal_(conv.weight, std=0.5)
    with torch.no_grad():
        diff = (short_conv_by_hand(conv, h) - conv(h)).abs().max().item()
    assert diff <= 1e-5, diff
    print(f"kernel 4, {conv.weight.numel()} weights; max |by hand - ShortConv| = {diff:.1e} (tolerance 1e-5)")
    """),
    md(r"""
    ## The whole model

    A block is *pre-norm* with two residual branches,
    $x \leftarrow x + \mathrm{attn}(\mathrm{norm}(x))$ and then
    $x \leftarrow x + \mathrm{mlp}(\mathrm{norm}(x))$ (with a $\mathrm{conv}$ after each norm when
    `conv_kernel` > 0): each sub-layer adds a correction
    to a running sum, the *residual stream*, which keeps gradients flowing through many blocks. The model
    is the embedding, the blocks, a last RMSNorm and `lm_head`. Built from the hand-written pieces above,
    it must give the model's logits: on one story (where the causal mask is the document mask), on a
    model with short convolutions (with random weights, so that the comparison covers them), and on
    the two packed stories with the document mask built by hand above.
    """),
    code(r"""
    def gpt_by_hand(model, ids, mask=None):
        T, eps = ids.shape[1], model.config.norm_eps
        x = model.tok_emb(ids)
        for block in model.blocks:
            h = rms_norm_by_hand(x, block.attn_norm.weight, eps)
            if block.attn_conv is not None:
                h = short_conv_by_hand(block.attn_conv, h)
            x = x + attention_by_hand(block.attn, h, torch.arange(T), mask)[0]
            h = rms_norm_by_hand(x, block.mlp_norm.weight, eps)
            if block.mlp_conv is not None:
                h = short_conv_by_hand(block.mlp_conv, h)
            x = x + swiglu_by_hand(block.mlp, h)
        return model.lm_head(rms_norm_by_hand(x, model.final_norm.weight, eps))       # (batch, seq, vocab)


    with_convs = GPT(GPTConfig(**{**config.to_dict(), "conv_kernel": 4})).eval()
    with torch.no_grad():
        for m in with_convs.modules():
            if isinstance(m, ShortConv):
                torch.nn.init.normal_(m.weight, std=0.1)
        logits = model(ids)
        diff = (gpt_by_hand(model, ids) - logits).abs().max().item()
        diff_convs = (gpt_by_hand(with_convs, ids) - with_convs(ids)).abs().max().item()
        diff_packed = (gpt_by_hand(model, packed, by_hand) - model(packed)).abs().max().item()
    assert max(diff, diff_convs, diff_packed) <= 1e-5, (diff, diff_convs, diff_packed)
    print(f"logits {tuple(logits.shape)}; max |by hand - GPT| = {diff:.1e}, with short convolutions "
          f"{diff_convs:.1e}, two packed stories {diff_packed:.1e} (tolerance 1e-5)")

    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    print(f"loss of the untrained model on this story: {loss:.3f} nats/token; "
          f"a uniform guess over {config.vocab_size} tokens costs ln {config.vocab_size} = {math.log(config.vocab_size):.3f}")
    """),
    md(r"""
    The untrained model's loss is close to that of a uniform guess. That is by design: all weights
    start small (a normal distribution with standard deviation 0.02), so the initial logits are nearly
    equal and the model starts from "I know nothing" rather than from a confident wrong answer. The
    output projections of both residual branches start even smaller, scaled by $1/\sqrt{2 \cdot
    n_{layers}}$, so the residual stream does not grow with depth.

    ## Where the parameters are

    Counting by component, for vocabulary $V$, width $d$, $L$ blocks, head size $d_h$ and hidden size
    $d_{ff}$: the embedding is $V d$; each block has $4d^2$ in attention ($W_q, W_k, W_v$ and the output
    projection), $3 d\, d_{ff}$ in the SwiGLU and $2 k d$ in its two short convolutions if it has them
    (kernel $k$); the
    norms are gains only, two of size $d$ per block, two of size $d_h$ for QK-norm, and a final one; the tied `lm_head` adds nothing. The formula must
    match `GPT.param_counts()`.
    """),
    code(r"""
    def count_by_hand(c):
        d, L = c.d_model, c.n_layers
        counts = {"embedding": c.vocab_size * d, "attention": L * 4 * d * d,
                  **({"conv": L * 2 * c.conv_kernel * d} if c.conv_kernel else {}),
                  "mlp": L * 3 * d * c.d_ff, "norms": L * (2 * d + 2 * c.head_dim * c.qk_norm) + d,
                  "lm_head": 0 if c.tie_embeddings else c.vocab_size * d}
        return {**counts, "total": sum(counts.values())}


    assert count_by_hand(config) == model.param_counts()
    assert count_by_hand(with_convs.config) == with_convs.param_counts()
    for name, n in model.param_counts().items():
        print(f"{name:10s} {n:9,d}")

    widths = [64, 128, 256, 512]
    shares = {}
    for d in widths:
        c = GPTConfig(vocab_size=config.vocab_size, d_model=d, n_heads=config.n_heads, eot_id=config.eot_id)
        counts = GPT(c).param_counts()
        assert counts == count_by_hand(c)
        shares[d] = counts

    components = ["embedding", "attention", "mlp", "norms"]  # no short convolutions by default
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    ours = model.param_counts()
    bars = ax.bar(components, [ours[k] for k in components], color=[f"C{i}" for i in range(len(components))])
    ax.bar_label(bars, labels=[f"{ours[k]:,}" for k in components], fontsize=8)
    ax.set_ylabel("parameters")
    ax.set_title(f"This model: {ours['total']:,} parameters")
    bottom = [0.0] * len(widths)
    for i, k in enumerate(components):
        frac = [100 * shares[d][k] / shares[d]["total"] for d in widths]
        bx.bar([str(d) for d in widths], frac, bottom=bottom, label=k, color=f"C{i}")
        bottom = [b + f for b, f in zip(bottom, frac)]
    bx.set_xlabel(f"d_model ({config.n_layers} blocks, vocabulary {config.vocab_size})")
    bx.set_ylabel("share of all parameters (%)")
    bx.set_title("Where the parameters go as the model widens")
    bx.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    show(fig)
    """),
    md(r"""
    At this size the blocks hold most of the parameters, the SwiGLU about twice as many as attention
    (its $3 d\, d_{ff} \approx 8 d^2$ against $4 d^2$), while the embedding is a modest slice because the
    story world needs only a few hundred tokens. The right panel shows the trend: the blocks grow with
    $d^2$ and the embedding only with $d$, so the wider the model, the smaller the embedding's share.
    (With a vocabulary of 100,000 tokens, as large language models have, a narrow model would be mostly
    embedding.) The norms are a rounding error everywhere, and so would be the short convolutions.

    **Next:** notebook 3 trains this model on the story corpus and measures it against the exact bound.
    """),
]


# ---- 3. pretraining ----------------------------------------------------------------------------

PRETRAINING = [
    md(r"""
    # 3. Pretraining

    Here the model of notebook 2 learns the story world. The run is short (a couple of minutes on a
    laptop CPU in the full setting; `make pretrain` trains the same model for 1,500 steps instead of
    400, with a warm-up of 300 steps instead of 40, on 60,000 training stories instead of 20,000 and
    with 2,000 validation stories instead of 500, so its bound is computed on another set), but it has
    every part of the real one: the corpus and its exact bound, the token stream, random
    training windows, the learning-rate schedule, the loss in bits per character against the bound,
    and samples scored by the world. At the end we check the KV cache that makes generation fast:
    same logits, much less work.
    """),
    SETUP_MD,
    code(SETUP),
    md(r"""
    ## The two settings

    All sizes are in one place. The full setting trains the package's default model (d_model 128,
    4 blocks, 4 heads, about 0.85M parameters) for 400 steps of 16 windows of 256 tokens; the fast
    setting trains a toy model for a few steps, only to check that the cells run.
    """),
    code(r"""
    import math
    import shutil
    import time

    import torch.nn.functional as F

    from microlm.data import IGNORE, document_rows, encode_documents, window_batch
    from microlm.evaluate import evaluate_lm, sample_texts, story_validity
    from microlm.generate import generate
    from microlm.model import GPT, GPTConfig, KVCache
    from microlm.plots import plot_pretrain_loss
    from microlm.tokenizer import EOT, Tokenizer, train_bpe
    from microlm.train import TrainConfig, lr_at, read_metrics, train
    from microlm.world import InvalidStory, World, entropy_stats, generate_splits, log_prob, parse

    if FAST:
        N_TRAIN, N_VAL, N_SAMPLES = 300, 20, 8
        MODEL = dict(d_model=32, n_layers=1, n_heads=2)
        TRAIN = dict(max_steps=12, batch_size=4, warmup_steps=3, eval_every=6)
    else:
        N_TRAIN, N_VAL, N_SAMPLES = 20_000, 500, 100
        MODEL = dict()  # the package defaults
        TRAIN = dict(max_steps=400, batch_size=16, warmup_steps=40, eval_every=50)
    """),
    md(r"""
    ## Corpus, bound, tokenizer

    As in notebook 1: stories from the world, split by hash, the exact entropy of the validation split
    in bits per character (the bound), and a BPE tokenizer trained on the training split only.
    """),
    code(r"""
    world = World()
    splits = generate_splits(world, {"train": N_TRAIN, "val": N_VAL}, seed=1337)
    train_texts, val_texts = [s.text for s in splits["train"]], [s.text for s in splits["val"]]
    bound = entropy_stats(splits["val"])["bits_per_char"]
    tok = Tokenizer.from_bpe(train_bpe(EOT.join(train_texts), vocab_size=512))
    print(f"{len(train_texts):,} training and {len(val_texts):,} validation stories; "
          f"bound {bound:.4f} bits/char; vocabulary {tok.n_vocab}")
    """),
    md(r"""
    ## From stories to training batches

    The training stories become one long stream of tokens, each story preceded by `<|endoftext|>`.
    A training batch is a set of windows cut from the stream at random places: the inputs are
    `context_length` tokens and the targets are the same tokens shifted left by one, because at every
    position the model predicts the next token. Where a window starts is decided by the seed and the
    step number only, so a resumed run sees exactly the batches an uninterrupted one would.

    A random window usually starts in the middle of a story, which the model then sees without its
    beginning. Validation avoids that: `document_rows` packs whole stories into rows that start at
    `<|endoftext|>`, and marks the padding at the end of a row with `IGNORE`, so that no loss is taken
    there. The model then sees every validation story as the world wrote it, from its first word, which
    is what makes its loss comparable with the bound.
    """),
    code(r"""
    config = GPTConfig(vocab_size=tok.n_vocab, eot_id=tok.eot_id, **MODEL)
    stream = encode_documents(tok, train_texts)
    chars_per_token = sum(len(t) + 1 for t in train_texts) / (len(stream) - 1)
    evalset = document_rows(tok, val_texts, config.context_length)
    print(f"training stream: {len(stream):,} tokens ({chars_per_token:.2f} characters per token)")
    print(f"validation: {len(evalset.inputs)} rows of {config.context_length}, "
          f"{(evalset.targets != IGNORE).float().mean():.0%} of the positions scored")

    x, y = window_batch(stream, batch_size=2, context=config.context_length, seed=0, step=0)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs moved by one
    print("\ninputs  start:", repr(tok.decode(x[0, :24].tolist())))
    print("targets start:", repr(tok.decode(y[0, :24].tolist())))
    """),
    md(r"""
    ## The loss in bits per character

    Training minimises the cross-entropy in nats per token. To compare with the bound, the total loss
    over every scored validation target is converted to bits ($\div \ln 2$) and divided by the
    characters those targets stand for (each story's characters plus its newline, which the end token
    predicts). Unlike nats per token, bits per character does not depend on the tokenizer. Here it is
    computed by hand for the untrained model and checked against `evaluate_lm`:
    """),
    code(r"""
    torch.manual_seed(1337)
    model = GPT(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")

    total_nats = 0.0
    with torch.no_grad():
        for i in range(0, len(evalset.inputs), 32):  # the batches evaluate_lm uses
            logits = model.eval()(evalset.inputs[i:i + 32])
            total_nats += F.cross_entropy(logits.flatten(0, 1), evalset.targets[i:i + 32].flatten(),
                                          ignore_index=IGNORE, reduction="sum").item()
    bpc_by_hand = total_nats / math.log(2) / evalset.n_chars
    before = evaluate_lm(model, evalset)
    assert math.isclose(bpc_by_hand, before["val_bpc"], rel_tol=1e-9)
    print(f"untrained: {before['val_bpc']:.3f} bits/char, {before['val_bpc'] / bound:.1f} x the bound")
    """),
    md(r"""
    ## The learning-rate schedule

    The optimizer is AdamW, with weight decay on the matrices only (shrinking the norms' gains toward
    zero would fight their purpose). The learning rate rises linearly during a short warmup, while
    Adam's running statistics are still unreliable, then follows a cosine down to a tenth of its peak.
    The package's convention: step 0 is the first update and already gets `lr / warmup_steps`, and the
    last step ends exactly at the floor. The peak of 1e-2 is high for AdamW; notebook 2's QK-norm is
    what keeps it stable.
    """),
    code(r"""
    cfg = TrainConfig(**TRAIN, checkpoint_every=TRAIN["max_steps"], seed=1337)
    assert lr_at(0, cfg) == cfg.lr / cfg.warmup_steps
    assert math.isclose(lr_at(cfg.max_steps - 1, cfg), cfg.lr * cfg.min_lr_ratio)

    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.plot(range(cfg.max_steps), [lr_at(s, cfg) for s in range(cfg.max_steps)])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"warmup {cfg.warmup_steps} steps, then cosine to {cfg.min_lr_ratio} x peak")
    ax.grid(alpha=0.3)
    show(fig)
    """),
    md(r"""
    ## The run

    `microlm.train.train` is the single loop used for pretraining and fine-tuning. It asks for a
    batch with `get_batch(step)`, clips the gradient norm, steps the optimizer, and calls
    `evaluate(model)` every `eval_every` steps; every step's numbers go to `metrics.jsonl` in the run
    folder, together with a checkpoint that `--resume` could continue from. Our `evaluate` prints a
    line each time, so the run reports as it goes.
    """),
    code(r"""
    shutil.rmtree(OUT, ignore_errors=True)  # a fresh run every time the notebook runs
    start = time.perf_counter()
    evaluations = []


    def evaluate(m):
        result = evaluate_lm(m, evalset)
        evaluations.append(result)
        step = min(len(evaluations) * cfg.eval_every, cfg.max_steps)
        print(f"step {step:4d}: validation {result['val_bpc']:.4f} bits/char = {result['val_bpc'] / bound:.3f} x bound"
              f"   ({time.perf_counter() - start:.0f} s)")
        return result


    summary = train(model, cfg,
                    get_batch=lambda i: window_batch(stream, cfg.batch_size, config.context_length, cfg.seed, i),
                    evaluate=evaluate, run_dir=OUT, flops_per_token=model.flops_per_token(),
                    chars_per_token=chars_per_token, progress=False)
    print(f"\n{summary['tokens_seen']:,} tokens in {summary['train_seconds']:.0f} s: "
          f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['mfu']:.0%} of this machine's measured fp32 matmul peak")
    """),
    md(r"""
    ## The loss curve

    This is the figure `make pretrain` writes (`microlm.plots.plot_pretrain_loss`): bits per character
    on the training batches (thin line) and on the validation split (dots), against tokens seen, with
    the exact bound as a dashed line. No model can beat it in expectation (on one validation set, only
    by chance, and by little); the gap to it is everything the model has yet to learn.

    In the full setting the curve drops fast at first (the model learns the words and the shape of a
    story), then may sit on a plateau, where it produces well-formed sentences without tracking who
    holds what, before it starts to use the story so far. The training curve lies a little *above*
    validation: training windows start at random places, so their first story lacks its beginning and
    is harder to predict.
    """),
    code(r"""
    plot_pretrain_loss(read_metrics(OUT / "metrics.jsonl"), OUT / "loss.png", bound)
    display(Image(filename=str(OUT / "loss.png")))
    """),
    md(r"""
    ## Samples, scored by the world

    Loss is an average; samples show what the model actually does. We let it write stories at
    temperature 1 (sampling from its distribution as it is) and score each with the world's parser:
    a valid sample is one the world could have written, and its bits are its exact information
    content. For the first invalid sample, the parser points at the character where the story broke
    the rules and lists what the world would have allowed there. Typical mistakes are state-tracking
    mistakes: an object passed on by someone who no longer holds it, a move from a house the person
    has already left.
    """),
    code(r"""
    samples = sample_texts(model, tok, N_SAMPLES, temperature=1.0, seed=0)
    scores = [log_prob(world, s) for s in samples]
    print(f"{story_validity(world, samples):.0%} of {len(samples)} samples are valid stories\n")
    for text, lp in list(zip(samples, scores))[:6]:
        tag = f"valid, {-lp / math.log(2):5.1f} bits" if lp > -math.inf else "INVALID"
        shown = repr(text)[1:-1]  # newlines and unprintable characters escaped
        print(f"[{tag}] {shown[:160]}{' ...' if len(shown) > 160 else ''}")

    invalid = [s for s, lp in zip(samples, scores) if lp == -math.inf]
    if invalid:
        try:
            parse(world, invalid[0])
        except InvalidStory as e:
            text = invalid[0]
            print(f"\nfirst invalid sample, breaking at character {e.pos}:\n  ...{repr(text[max(0, e.pos - 70):e.pos])[1:-1]}"
                  f" >>> {repr(text[e.pos:e.pos + 25])[1:-1]}\n  the world allowed: {e.expected[:6]}")
    """),
    md(r"""
    ## Which look-ups has it learned?

    A story restates what it already said: `Tom leaves Mia's house` repeats where Tom is, and `The cup
    passes from Mia` who holds the cup. Those words cost no entropy (the story so far fixes them), so a
    model that tracks the world predicts them surely. `lookup_accuracy` feeds validation stories to the
    model and checks its top choice at each restated word, grouped by what is restated and how far back
    the story said it: in the introduction, in the event just before, or in an earlier event (a real
    look-up past other events). Bits per character average all of this away; this table shows which
    rules the model has learned and which it still guesses.
    """),
    code(r"""
    from microlm.evaluate import lookup_accuracy

    for name, c in lookup_accuracy(model, tok, world, val_texts[:200]).items():
        print(f"{name:<24} {c['accuracy']:6.1%} of {c['total']}")
    """),
    md(r"""
    ## Is the key where attention can find it?

    To restate where Tom is, the model has to find the word where his last move put him (`... for
    Ann's house`) among every other destination in the story. Attention finds positions by what is
    written *at* them: so at `Ann` the model must have written "Tom moved here", taken from the sentence's
    first word (or, in a world with pronouns, from whoever `He` is). Likewise, to restate who holds the cup, it must have written "the cup" at
    the receiver of the cup's last pass.

    A **linear probe** checks whether it did. `key_probes` collects the residual stream after each block
    at every such word (`world.stored_facts`: a move's destination, a pass's receiver) and trains a
    softmax regression to read the key (who moved; which object passed) on 80% of them, then scores it on
    the rest. A high score means the key is there, in a form one matrix (such as an attention head's key
    projection) can read; a score near chance means it is not, and no head can look the fact up by it.
    """),
    code(r"""
    from microlm.pretrain import PROBE_LABELS, probe_row  # the format `make pretrain` prints
    from microlm.evaluate import key_probes

    for what, p in key_probes(model, tok, world, val_texts[:200]).items():
        print(f"{PROBE_LABELS[what]:<32}", probe_row(p))
    """),
    md(r"""
    ## The KV cache: same logits, less work

    To generate, a model predicts one token, appends it, and predicts again. Without a cache, each
    step runs the whole sequence through the model again, though the keys and values of the earlier
    positions have not changed: causal attention means a position never depends on later ones. The
    KV cache keeps each layer's keys and values, so each step processes only the new token. The usual
    bug is positional: the new token's RoPE angle must be its position in the sequence, not 0.

    First the check: feeding a story token by token through the cache must give the same logits as
    one pass over the whole story, and greedy generation must produce the same tokens with and
    without the cache.
    """),
    code(r"""
    model.eval()
    ids = torch.tensor([[tok.eot_id] + tok.encode_ordinary(val_texts[0])])
    with torch.no_grad():
        whole = model(ids)
        cache = KVCache.for_model(model, batch_size=1)
        stepwise = torch.cat([model(ids[:, i:i + 1], cache) for i in range(ids.shape[1])], dim=1)
    diff = (whole - stepwise).abs().max().item()
    print(f"max |one pass - token by token with the cache| = {diff:.1e} over {ids.shape[1]} positions "
          f"(logits up to {whole.abs().max().item():.1f}; tolerance 1e-4)")
    assert diff <= 1e-4

    N_NEW = 48 if FAST else 200
    prompt = torch.tensor([[tok.eot_id]])
    timings = {}
    for use_cache in (True, False):
        t = time.perf_counter()
        tokens = generate(model, prompt, N_NEW, temperature=0.0, use_cache=use_cache)
        timings[use_cache] = (time.perf_counter() - t, tokens)
    assert timings[True][1] == timings[False][1]
    print(f"greedy, {N_NEW} tokens: {timings[True][0]:.2f} s with the cache, {timings[False][0]:.2f} s without, "
          "same tokens")
    """),
    md(r"""
    Where the time goes: the figure times each generation step separately. With the cache, a step
    costs about the same at every position (one token through the model, plus attention over the
    cached keys, which is cheap at this length). Without it, step $t$ pushes all $t$ tokens through
    the model again, so its cost grows with the position and the whole generation grows with the
    square of the length.
    """),
    code(r"""
    sequence = torch.tensor([[tok.eot_id] + timings[True][1][0]])
    with_cache, without = [], []
    cache = KVCache.for_model(model, batch_size=1)
    with torch.no_grad():
        for t in range(N_NEW):
            t0 = time.perf_counter()
            model(sequence[:, t:t + 1], cache)
            with_cache.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model(sequence[:, :t + 1])
            without.append(time.perf_counter() - t0)

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot([1e3 * s for s in without], label="no cache: the whole prefix again")
    ax.plot([1e3 * s for s in with_cache], label="KV cache: the new token only")
    ax.set_xlabel("position of the new token")
    ax.set_ylabel("ms for this step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    show(fig)
    """),
    md(r"""
    ## Where this leaves us

    The short run above stops well before the bound; `make pretrain` runs the same code for 1,500
    steps and gets much closer. Its numbers, when that run is present in `runs/pretrain`, are printed
    below (full setting only). Compare its two measures: a model can come close to the bound in bits
    per character long before its samples are reliably valid, because the loss forgives a little
    probability on a wrong move at every step, and a story takes many steps.

    **Next:** notebook 4 freezes a pretrained model and adds LoRA adapters to it.
    """),
    code(r"""
    finished = Path("runs/pretrain/summary.json")
    if not FAST and finished.is_file():
        import json
        s = json.loads(finished.read_text())
        print(f"runs/pretrain: {s['steps']} steps, validation {s['val_bpc']:.4f} bits/char = "
              f"{s['val_bpc'] / s['bound_bpc']:.3f} x the bound; {s.get('sample_validity', float('nan')):.0%} of its samples valid")
        for name, c in s.get("lookups", {}).items():
            print(f"  look-up, {name:<24} {c['accuracy']:6.1%} of {c['total']}")
        for what, p in s.get("key_probes", {}).items():
            print(f"  probe, {PROBE_LABELS[what]:<32}", probe_row(p))
    else:
        print("(no finished `make pretrain` run to compare with" + (", or the fast setting)" if FAST else ")"))
    """),
]


# ---- 4. LoRA -----------------------------------------------------------------------------------

LORA = [
    md(r"""
    # 4. LoRA: low-rank adapters

    Fine-tuning every weight of a large model means storing a full copy of it for every task, and
    training it needs memory for a gradient and two Adam moments per weight. LoRA (Hu et al. 2021)
    freezes the pretrained weight $W$ and learns only a low-rank *change* to it:

    $$y = W x + \frac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r \times d_{in}},\; B \in \mathbb{R}^{d_{out} \times r},\; r \ll d$$

    This notebook builds `LoRALinear` from that formula and checks it against `microlm.lora`, shows why
    $B$ starts at zero, counts what LoRA trains, puts adapters on a pretrained model, checks that only
    $A$ and $B$ receive gradients, and confirms with an SVD that the learned change has rank $r$.
    """),
    SETUP_MD,
    code(SETUP),
    md(r"""
    ## LoRALinear from the formula

    The package's `LoRALinear` *holds* the original `nn.Linear` (frozen) and adds two small linears,
    `lora_A` ($d_{in} \to r$) and `lora_B` ($r \to d_{out}$), and a scale $\alpha / r$. The hand version is
    the formula in one line. A freshly made adapter has $B = 0$, which would make any comparison
    trivially true, so both get random non-zero values first, as if trained.

    After training, the change can be folded into the weight once, $W' = W + \frac{\alpha}{r} B A$
    (`merge`): the layer then computes the same function at the cost of a plain linear. The cell
    checks the merged weight against the formula, that the output does not change, and two pitfalls:
    merging twice is refused (it would add the change twice), and unmerging gives $W$ back only up
    to floating-point rounding, not bit for bit.
    """),
    code(r"""
    import copy

    import torch.nn as nn

    from microlm.lora import LoRALinear, apply_lora_to_model, base_fingerprint, lora_layers, parameter_report

    torch.manual_seed(0)
    d_in, d_out, r, alpha = 64, 48, 4, 8.0
    base_linear = nn.Linear(d_in, d_out, bias=False)
    A = 0.1 * torch.randn(r, d_in)
    B = 0.1 * torch.randn(d_out, r)  # non-zero, as after training
    scale = alpha / r


    def lora_by_hand(x, W, A, B, scale):
        return x @ W.T + scale * (x @ A.T) @ B.T


    W = base_linear.weight.detach().clone()
    layer = LoRALinear(base_linear, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    x = torch.randn(5, d_in)
    with torch.no_grad():
        y = layer(x)
        diff = (y - lora_by_hand(x, W, A, B, scale)).abs().max().item()
        change = (y - x @ W.T).abs().max().item()
    assert diff <= 1e-6 and change > 1e-2
    print(f"max |by hand - LoRALinear| = {diff:.1e} (tolerance 1e-6); "
          f"the adapter moves the output by up to {change:.3f}")

    layer.merge()
    with torch.no_grad():
        assert torch.allclose(layer.base.weight, W + scale * B @ A, atol=1e-6)
        merged_diff = (layer(x) - y).abs().max().item()
    assert merged_diff <= 1e-5
    print(f"merged: W' = W + (alpha/r) B A; max |merged - unmerged output| = {merged_diff:.1e} (tolerance 1e-5)")
    try:
        layer.merge()
    except RuntimeError as e:
        print("a second merge is refused:", e)
    layer.unmerge()
    unmerge_error = (layer.base.weight - W).abs().max().item()
    print(f"after unmerge, max |W - original W| = {unmerge_error:.1e} (rounding, not exactly 0)")
    """),
    md(r"""
    ## Why B starts at zero

    `LoRALinear` initialises $A$ randomly (as `nn.Linear` would) and $B$ to zero. Then $BA = 0$: the
    adapted model starts as *exactly* the pretrained model, and fine-tuning begins from what
    pretraining achieved instead of from a random perturbation of it.

    Zero is not a dead end, as the gradients show. With $h = Ax$, the gradient of $B$ is
    $\frac{\alpha}{r}\,\frac{\partial L}{\partial y} h^\top$, which is non-zero because $A$ is random,
    while the gradient of $A$ is $\frac{\alpha}{r}\,B^\top \frac{\partial L}{\partial y} x^\top$, exactly
    zero as long as $B = 0$. So the first step moves $B$, and from then on both move. Had *both* started
    at zero, both gradients would be zero forever: nothing would ever train.
    """),
    code(r"""
    fresh = LoRALinear(nn.Linear(d_in, d_out, bias=False), r=r, alpha=alpha)
    assert torch.equal(fresh(x), fresh.base(x))  # exactly the base layer's output
    fresh(x).square().sum().backward()
    grad_A, grad_B = fresh.lora_A.weight.grad.abs().max().item(), fresh.lora_B.weight.grad.abs().max().item()
    print(f"B = 0, A random: max |grad A| = {grad_A:.2e}, max |grad B| = {grad_B:.2e}")
    assert grad_A == 0 and grad_B > 0

    with torch.no_grad():
        fresh.lora_A.weight.zero_()
    fresh.zero_grad()
    fresh(x).square().sum().backward()
    print(f"B = 0 and A = 0:  max |grad A| = {fresh.lora_A.weight.grad.abs().max().item():.2e}, "
          f"max |grad B| = {fresh.lora_B.weight.grad.abs().max().item():.2e}  (stuck)")
    """),
    md(r"""
    ## What LoRA trains: $r(d_{in} + d_{out})$ instead of $d_{in} d_{out}$

    For a square $d \times d$ matrix, LoRA trains $2dr$ numbers instead of $d^2$, a fraction $2r/d$. The
    figure plots both for our model's width ($d = 128$) and for a width typical of a 7-billion-parameter
    model ($d = 4096$). The saving grows with the width: at $d = 4096$ and $r = 8$, LoRA trains 0.4% of
    each adapted matrix. Where a line reaches the matrix size, at $r = d/2$, LoRA costs as much as the
    matrix itself and saves nothing.
    """),
    code(r"""
    assert sum(p.numel() for p in (layer.lora_A.weight, layer.lora_B.weight)) == r * (d_in + d_out)

    ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, d in enumerate((128, 4096)):
        rs = [q for q in ranks if q <= d]
        ax.plot(rs, [2 * d * q for q in rs], "o-", color=f"C{i}", label=f"LoRA, d = {d}: 2 d r")
        ax.axhline(d * d, color=f"C{i}", ls="--", lw=1, label=f"full matrix, d = {d}: d^2")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(q) for q in ranks])
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters per d x d matrix")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    show(fig)
    for d in (128, 4096):
        print(f"d = {d:4d}, r = 8: LoRA trains {2 * d * 8:,} of {d * d:,} numbers ({2 * 8 / d:.2%})")
    """),
    BASE_MD,
    code(BASE),
    md(r"""
    ## Adapters on the pretrained model

    `apply_lora_to_model` freezes every parameter of the model, then replaces each linear layer whose
    name is one of the targets (by default the four attention projections `q_proj`, `k_proj`, `v_proj`,
    `output_proj`) by a `LoRALinear` that holds it. The printout shows one attention module after the
    swap. With $B = 0$ the adapted model computes exactly what the base computes, and the number of
    trainable parameters follows the formula: 4 matrices per block, $r(d + d)$ each.
    """),
    code(r"""
    import random

    from microlm.world import World, sample_story

    R, ALPHA = 8, 16.0
    model = apply_lora_to_model(copy.deepcopy(base_model), r=R, alpha=ALPHA)
    print(model.blocks[0].attn)
    print(parameter_report(model))

    c = model.config
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == c.n_layers * 4 * R * (c.d_model + c.d_model)

    world = World.from_dict(base_config["data"]["world"])
    ids = torch.tensor([[tok.eot_id] + tok.encode_ordinary(sample_story(world, random.Random(0)).text)])
    with torch.no_grad():
        assert torch.equal(model(ids), base_model(ids))
    print("with B = 0 the adapted model's logits equal the base model's exactly")
    """),
    md(r"""
    ## Only A and B receive gradients

    Fine-tuning in notebook 5 teaches the model to answer questions about a story (the question set is
    explained there). One backward pass on a batch of those questions shows what LoRA trains: every
    parameter that received a gradient is an `lora_A` or `lora_B` weight; the frozen base weights
    received none, so no memory is spent on their gradients or optimizer state. And as predicted above,
    at this first step the gradients of $A$ are exactly zero, those of $B$ are not.
    """),
    code(r"""
    from microlm.finetune import sft_batch
    from microlm.sft import encode_examples, make_sft_set
    from microlm.train import TrainConfig, make_optimizer, masked_loss

    N_QUESTIONS, STEPS = (64, 5) if FAST else (1000, 60)
    examples = make_sft_set(world, {"train": N_QUESTIONS}, seed=0)["train"]
    encoded, skipped = encode_examples(tok, examples, c.context_length)

    model.train()
    x, y = sft_batch(encoded, 8, tok.eot_id, seed=0, step=0)
    masked_loss(model(x), y).backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(name.endswith(("lora_A.weight", "lora_B.weight")) for name in with_grad)
    print(f"{len(with_grad)} tensors received a gradient, all of them A or B; "
          f"{sum(1 for p in model.parameters() if not p.requires_grad)} frozen tensors received none")
    layers = lora_layers(model)
    assert all(l.lora_A.weight.grad.abs().max() == 0 and l.lora_B.weight.grad.abs().max() > 0 for l in layers.values())
    print("at the first step: every grad A is exactly 0, every grad B is not")
    """),
    md(r"""
    A few optimizer steps on those questions (a plain loop with a constant learning rate; notebook 5
    uses the package's training loop). The base weights must come out of it untouched: their
    fingerprint, a hash of every frozen tensor, is the same before and after.
    """),
    code(r"""
    before = base_fingerprint(model)
    optimizer = make_optimizer(model, TrainConfig(lr=5e-3, weight_decay=0.0))
    for step in range(STEPS):
        x, y = sft_batch(encoded, 16, tok.eot_id, seed=0, step=step)
        loss = masked_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, STEPS // 5) == 0 or step == STEPS - 1:
            print(f"step {step:3d}: loss on the answer tokens {loss.item():.3f}")
    model.eval()
    assert base_fingerprint(model) == before
    print("base weights unchanged (fingerprint", before + ")")
    """),
    md(r"""
    ## The rank of the change, by SVD

    The change LoRA makes to a weight is $\Delta W = \frac{\alpha}{r} B A$, a $d \times d$ matrix that is a
    product through an $r$-dimensional bottleneck, so its rank is at most $r$. The singular values say
    how many independent directions a matrix really uses. For every adapted layer, the figure shows the
    singular values of $\Delta W$ (coloured) next to those of one pretrained weight $W$ (black): $W$
    uses all its directions, while each $\Delta W$ has exactly $r$ real singular values and then drops
    by many orders of magnitude to floating-point noise.
    """),
    code(r"""
    deltas = {name: l.delta_weight().detach() for name, l in layers.items()}
    ranks_found = {name: torch.linalg.matrix_rank(dw).item() for name, dw in deltas.items()}
    assert all(k == R for k in ranks_found.values()), ranks_found
    print(f"rank of (alpha/r) B A in all {len(deltas)} adapted layers: {sorted(set(ranks_found.values()))} (r = {R})")

    first = next(iter(layers.values()))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, dw in deltas.items():
        ax.semilogy(torch.linalg.svdvals(dw), lw=0.8, alpha=0.6)
    ax.semilogy(torch.linalg.svdvals(first.base.weight.detach()), "k", lw=2, label="a pretrained W")
    ax.axvline(R - 0.5, color="grey", ls=":", label=f"r = {R}")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value")
    ax.set_title("Singular values: each coloured line is one adapter's change")
    ax.legend()
    ax.grid(alpha=0.3)
    show(fig)
    """),
    md(r"""
    ## Summary

    * `LoRALinear` computes $Wx + \frac{\alpha}{r} BAx$ and can fold the change into $W$ once.
    * $B = 0$ at the start makes the adapted model equal to the base; the first step moves $B$.
    * Only $A$ and $B$ train: $r(d_{in} + d_{out})$ numbers per adapted matrix, a fraction that shrinks
      as models get wider; the base weights stay untouched.
    * The change has rank $r$ exactly: a low-rank update, as the name says.

    **Next:** notebook 5 fine-tunes with LoRA on the question set, merges, and compares with
    fine-tuning every weight.
    """),
]


# ---- 5. fine-tune, merge, compare --------------------------------------------------------------

FINETUNE = [
    md(r"""
    # 5. Fine-tuning with LoRA: train, merge, compare

    Notebook 4 built the adapter; here it does a job. The pretrained model has only ever continued
    stories. We fine-tune it to answer questions about a story (who has an object, where someone is,
    what one person gave another) with LoRA, and then look at what the adapter costs and buys:
    accuracy before and after, merged against unmerged (same logits, different speed), the adapter
    file beside the model file, two adapters swapped on one base, and fine-tuning every weight instead.
    """),
    SETUP_MD,
    code(SETUP),
    md(r"""
    ## The two settings

    In the full setting, the adapter and the full fine-tune that `make lora-finetune` trained are used
    when they are there (`runs/lora`, `runs/full`, on the base `runs/pretrain`); otherwise they are
    trained here with the same recipe on fewer questions and for fewer steps. The fast setting trains everything for
    a handful of steps on a toy model: the mechanics are all there, the accuracies mean nothing.
    """),
    code(r"""
    import collections
    import copy
    import dataclasses
    import json

    from microlm.checkpoint import load_json
    from microlm.data import IGNORE
    from microlm.evaluate import logits_of, max_abs_diff, paired_ratio, per_token_latency
    from microlm.finetune import (LoRAConfig, accuracy, finetune_defaults, fitting, fixed_batches, load_lora_run,
                                  lora_config_from_dict, packing_context, prepare_model, run_finetune, sft_batch,
                                  training_memory)
    from microlm.lora import base_fingerprint, load_adapter, merge_and_unload, merge_lora, set_lora_enabled
    from microlm.plots import plot_finetune_loss, plot_latency
    from microlm.sft import collate, encode_example, make_sft_set, questions, read_sft_jsonl
    from microlm.train import TrainConfig, masked_loss, read_metrics
    from microlm.world import World, parse

    if FAST:
        SFT_SIZES, STEPS, BATCH = {"train": 60, "val": 16}, 4, 4
        N_EVAL, LATENCY_TOKENS, REPEATS = 16, 8, 3
    else:
        SFT_SIZES, STEPS, BATCH = {"train": 4000, "val": 300}, 200, 16
        N_EVAL, LATENCY_TOKENS, REPEATS = 300, 64, 21  # as `microlm compare`; with 7, merged and base came out 9% apart
    """),
    BASE_MD,
    code(BASE),
    md(r"""
    ## The question set

    Questions are asked about stories from a third split of the world that pretraining never sees.
    Because the world knows the final state of every story it writes, it knows every answer exactly:
    `questions(state)` lists all the questions a story answers unambiguously, and `make_sft_set` draws
    one per story, its kind chosen uniformly among the kinds that story can answer. An example is a
    *prompt* (the story, a newline, the question, and the cue for the answer) and a *response* (the
    exact answer).
    """),
    code(r"""
    world = World.from_dict(base_config["data"]["world"])
    example = make_sft_set(world, {"train": 1}, seed=0)["train"][0]
    print("prompt:  ", repr(example["prompt"]))
    print("response:", repr(example["response"]), " kind:", example["kind"])

    story_text = example["prompt"].split("\n")[0]
    _, state = parse(world, story_text)
    print("\nevery question this story answers:")
    for kind, question, answer in questions(state):
        print(f"  {kind:10s} {question:32s} ->{answer}")
    """),
    md(r"""
    ## The loss mask: learning the answer, not the question

    The example becomes the tokens `<|endoftext|> prompt response <|endoftext|>`. As in pretraining,
    the targets are the tokens shifted by one, but the loss is taken only where the *target* is part of
    the response or the final end token: the model should learn to answer, not to write stories and
    questions. Other positions get the target `IGNORE`, which the cross-entropy skips.

    The off-by-one trap: the first answer token is *predicted at the last prompt position*. So the mask
    is set on target positions, from index `n_prompt - 1` on. The hand-built targets must equal what
    `microlm.sft.collate` builds; the table shows the end of the example, position by position.
    """),
    code(r"""
    ids, n_prompt = encode_example(tok, example["prompt"], example["response"])
    inputs, targets = ids[:-1], ids[1:]
    targets_by_hand = [t if j >= n_prompt - 1 else IGNORE for j, t in enumerate(targets)]
    batch = collate([(ids, n_prompt)], pad_id=tok.eot_id)
    assert batch.targets[0].tolist() == targets_by_hand and batch.inputs[0].tolist() == inputs

    print(f"{len(ids)} tokens, of which {n_prompt} are the prompt (with the leading end token)\n")
    print(f"{'position':>8}  {'input':>14}  {'target':>14}  loss?")
    for j in range(len(inputs) - 10, len(inputs)):
        target = tok.decode([targets[j]])
        print(f"{j:8d}  {tok.decode([inputs[j]])!r:>14}  {target!r:>14}  {'yes' if targets_by_hand[j] != IGNORE else '-'}")
    """),
    md(r"""
    Questions are short (about 80 tokens) and uneven, so a batch of 16, each padded to the longest,
    would be half padding. Training *packs* them instead: `collate(..., context=...)` lays examples end
    to end in rows of the context length, the end token closing one example opening the next. The
    model's document mask (a token sees only its own document, which starts at an end token) keeps
    each example to itself, and RoPE depends only on distances, so a packed example costs the same
    loss as one alone in its row, as the check below shows in float64.
    """),
    code(r"""
    some = [encode_example(tok, ex["prompt"], ex["response"]) for ex in make_sft_set(world, {"train": 8}, seed=1)["train"]]
    alone, packed = collate(some, tok.eot_id), collate(some, tok.eot_id, context=base_model.config.context_length)
    check = copy.deepcopy(base_model).double()
    losses = [masked_loss(check(b.inputs), b.targets).item() for b in (alone, packed)]
    assert abs(losses[0] - losses[1]) < 1e-9
    print(f"8 questions: {alone.inputs.numel()} input positions one per row, {packed.inputs.numel()} packed; "
          f"loss {losses[0]:.6f} vs {losses[1]:.6f}")
    """),
    md(r"""
    ## A LoRA fine-tune

    `run_finetune` is what `microlm lora-finetune` runs: it writes the question set, measures the base
    model on the held-out questions, adds adapters (r = 8, alpha = 16 on the four attention
    projections), trains only them with the pretraining loop (batches drawn from the seed and the step,
    the loss masked as above), saves the adapter and measures again. Accuracy is *exact match*: the
    greedy answer, up to the end token, must equal the reference exactly.
    """),
    code(r"""
    if not FAST and BASE == Path("runs/pretrain") and Path("runs/lora/adapter/adapter_config.json").is_file():
        LORA = Path("runs/lora")
        print("using the adapter `make lora-finetune` trained:", LORA)
    else:
        LORA = OUT / "lora"
        lora_train = dataclasses.replace(finetune_defaults(full=False), max_steps=STEPS, batch_size=BATCH,
                                         warmup_steps=min(30, STEPS // 4), eval_every=max(1, STEPS // 4),
                                         checkpoint_every=STEPS)
        run_finetune(BASE, LORA, LoRAConfig(), lora_train, data_dir=OUT / "data", sizes=SFT_SIZES, overwrite=True,
                     progress=False)
    lora_model, tok, base_config, run_config = load_lora_run(LORA)
    lora_cfg, train_cfg = lora_config_from_dict(run_config["lora"]), TrainConfig(**run_config["train"])
    """),
    md(r"""
    ## Accuracy before and after

    The base model scores zero: it has never seen the question format, and exact match refuses an
    answer in the wrong form, even one that names the right person (the examples below show some). After
    fine-tuning, accuracy differs by kind of question. Each kind needs a different look-up in the story:
    the current holder of an object needs the object's last pass (or, if it never moved, the first
    sentence); where a person is needs their last move; what one person
    gave another needs a particular event and the object's colour from the first sentence.
    """),
    code(r"""
    summary = load_json(LORA / "summary.json")
    print(f"exact match on {summary['n_val']} held-out questions: base {summary['base_accuracy']:.1%} -> "
          f"LoRA {summary['accuracy']:.1%} after {summary['steps']} steps")
    for kind, acc in summary["accuracy_by_kind"].items():
        print(f"  {kind:10s} {acc:.1%}")
    print()
    for row in [json.loads(line) for line in (LORA / "answers.jsonl").read_text().splitlines()[:4]]:
        print(f"...{row['prompt'][-50:]!r}\n   reference {row['reference']!r}, LoRA {row['answer']!r}, base {row['base_answer']!r}")
    """),
    md(r"""
    ## Merged and unmerged: the same function

    Merging adds $\frac{\alpha}{r} BA$ into each adapted weight. In exact arithmetic the merged and
    unmerged models are the same function; in floating point they differ by rounding. To tell rounding
    from a bug, the comparison runs twice: in float32, where differences of order 1e-6 to 1e-4 are
    normal at these logit sizes, and again with every weight in float64, where rounding shrinks by a
    factor of about a billion. A real bug would not shrink. The greedy answers are compared too (never
    compare *sampled* answers: two random draws differ even for identical models). Finally, the check
    that cannot pass by accident: the adapter must change the logits of the base model. These checks
    run on the first 300 held-out questions (16 in the fast setting), so their exact match differs a
    little from the summary's, which counts all of them.
    """),
    code(r"""
    heldout = read_sft_jsonl(run_config["sft"]["val"])[:N_EVAL]
    examples, encoded, _ = fitting(tok, heldout, lora_model.config.context_length)
    batches = [(x, lengths) for x, _, lengths in fixed_batches(encoded, tok.eot_id)]

    merged = copy.deepcopy(lora_model)
    merge_lora(merged)
    logits_unmerged = logits_of(lora_model, batches)
    diff32 = max_abs_diff(logits_unmerged, logits_of(merged, batches))
    model64 = copy.deepcopy(lora_model).double()
    merged64 = copy.deepcopy(model64)
    merge_lora(merged64)
    diff64 = max_abs_diff(logits_of(model64, batches), logits_of(merged64, batches))
    moved = max_abs_diff(logits_unmerged, logits_of(base_model, batches))
    largest = max(t.abs().max().item() for t in logits_unmerged)

    acc_unmerged, answers_unmerged = accuracy(lora_model, tok, examples)
    acc_merged, answers_merged = accuracy(merged, tok, examples)
    same = sum(a == b for a, b in zip(answers_unmerged, answers_merged)) / len(examples)
    print(f"{len(examples)} held-out questions, logits up to {largest:.1f}")
    print(f"max |merged - unmerged| logits: float32 {diff32:.1e} (tolerance 1e-3), float64 {diff64:.1e} (tolerance 1e-9)")
    print(f"the adapter moves the base model's logits by up to {moved:.2f}")
    print(f"greedy answers identical: {same:.0%}; exact match unmerged {acc_unmerged:.1%}, merged {acc_merged:.1%}")
    assert diff32 <= 1e-3 and diff64 <= 1e-9 and moved > 1e-3
    assert same >= 0.9  # a flip needs two candidate tokens within rounding of each other
    """),
    md(r"""
    ## Merged and unmerged: different cost

    Unmerged, every adapted layer runs its base matrix *and* the two small LoRA matrices, an extra
    cost on every token. Merged, the adapter has disappeared into the weights. `merge_and_unload` goes
    one step further and puts plain `nn.Linear` layers back, so the model is a standard model again.
    The figure (the one `microlm compare` draws) is the time per generated token at batch size 1 with
    the KV cache, median of several repeats with the models taking turns, so that a busy moment of the
    machine hits them all alike; the whiskers are the fastest and slowest repeat. The ratio to the base
    is taken round by round (`paired_ratio`: each round's two times divided, then the median of those
    ratios, with their range): a slow moment that hits both models of a round cancels in its ratio.
    Expect merged to match the base and unmerged to be slower. (In the fast setting, timings of a toy
    model on a shared machine are mostly noise.)
    """),
    code(r"""
    unloaded = merge_and_unload(copy.deepcopy(lora_model))
    prompt = torch.tensor([[tok.eot_id] + tok.encode_ordinary(examples[0]["prompt"])])
    n_new = min(LATENCY_TOKENS, lora_model.config.context_length - prompt.shape[1])
    latency = per_token_latency({"base": base_model, "merged": unloaded, "unmerged": lora_model}, prompt, n_new, REPEATS)
    for name, t in latency.items():
        r = paired_ratio(t, latency["base"])
        print(f"{name:9s} {1e3 * t['median_s']:.2f} ms per token; {r['median']:.2f}x base "
              f"({r['min']:.2f}-{r['max']:.2f} across {t['n']} rounds)")
    plot_latency(latency, OUT / "latency.png")
    display(Image(filename=str(OUT / "latency.png")))
    """),
    md(r"""
    ## The adapter file beside the model file

    An adapter is saved on its own: `adapter_model.safetensors` holds only the A and B matrices, and
    `adapter_config.json` the settings needed to rebuild the layers (rank, alpha, targets, dropout) and
    a fingerprint of the base weights, so that loading the adapter onto another base model with the
    same shapes is refused instead of silently producing garbage. It also records the hash of the
    weights file, which pairs the two files: a save cut off between them is refused too. Both the
    adapter and the model are stored in float32.
    """),
    code(r"""
    from safetensors import safe_open

    adapter_dir = LORA / "adapter"
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    model_bytes = (Path(run_config["base"]) / "model.safetensors").stat().st_size
    adapter_config = load_json(adapter_dir / "adapter_config.json")
    print(json.dumps(adapter_config, indent=1))
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    print(f"\n{len(keys)} tensors in the adapter file, e.g. {keys[:2]}")
    print(f"adapter file {adapter_bytes / 1024:.1f} KiB, model file {model_bytes / 1024:.1f} KiB "
          f"({adapter_bytes / model_bytes:.1%})")
    assert base_fingerprint(base_model) == adapter_config["base_fingerprint"]
    """),
    md(r"""
    ## Two adapters, one base

    Since an adapter is small and the base never changes, one base model in memory can serve several
    tasks: swap the A and B matrices and the model does something else. To have a second task, we train
    a second adapter with the same recipe on one kind of question only (the most common kind). Then,
    on a single model object:

    1. load the second adapter and measure it;
    2. load the first one back: the logits must equal the first adapter's *bit for bit*, since loading
       copies the same numbers into the same places;
    3. switch the adapters off: the logits must equal the base model's, bit for bit;

    and throughout, the base weights' fingerprint must not change. (Accuracies here are on the same 300
    held-out questions as the merge check above.)
    """),
    code(r"""
    train_all = read_sft_jsonl(run_config["sft"]["train"])
    KIND = collections.Counter(ex.get("kind") for ex in train_all).most_common(1)[0][0]
    for split, rows in (("train", train_all), ("val", heldout)):
        subset = [ex for ex in rows if ex.get("kind") == KIND]
        (OUT / f"{KIND}_{split}.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in subset))
    SECOND = OUT / f"lora_{KIND}"
    second_summary = run_finetune(run_config["base"], SECOND, lora_cfg, train_cfg, sft_data=OUT / f"{KIND}_train.jsonl",
                 sft_val=OUT / f"{KIND}_val.jsonl", overwrite=True, progress=False)
    """),
    code(r"""
    kind_examples = [ex for ex in examples if ex.get("kind") == KIND]
    probe = batches[:1]
    swap = copy.deepcopy(lora_model)  # holds the first adapter
    fingerprint = base_fingerprint(swap)
    first_logits = logits_of(swap, probe)
    rows = {"first adapter (all kinds)": (accuracy(swap, tok, examples)[0], accuracy(swap, tok, kind_examples)[0])}

    load_adapter(swap, SECOND / "adapter")
    rows[f"second adapter ({KIND} only)"] = (accuracy(swap, tok, examples)[0], accuracy(swap, tok, kind_examples)[0])

    load_adapter(swap, adapter_dir)
    assert all(torch.equal(a, b) for a, b in zip(logits_of(swap, probe), first_logits))
    set_lora_enabled(swap, False)
    assert all(torch.equal(a, b) for a, b in zip(logits_of(swap, probe), logits_of(base_model, probe)))
    set_lora_enabled(swap, True)
    assert base_fingerprint(swap) == fingerprint

    width = max(len(name) for name in rows)
    print(f"{'':{width}s} {'all questions':>14s} {KIND + ' only':>16s}")
    for name, (a_all, a_kind) in rows.items():
        print(f"{name:{width}s} {a_all:14.1%} {a_kind:16.1%}")
    print("\nswapping back restored the first adapter's logits bit for bit; adapters off gave the base's; "
          "the base weights never changed")
    """),
    md(r"""
    Read the two rows against each other: the second adapter spent its whole budget on one kind of
    question and never saw the others (in the fast setting the numbers are noise). Whatever the
    accuracies, serving both costs one base model plus two small files, and switching between them is a
    copy of the adapter's weights (131 KiB here in the full setting, 4% of the model's file).

    ## LoRA against fine-tuning every weight

    The baseline trains all weights with the same data, batches and number of steps (and its own
    learning rate, 1e-3, since trained weights need smaller steps than an adapter that starts at zero).
    The loss curves (the figure `microlm compare` draws) show the loss on the answer tokens, for the
    training batches (thin) and the held-out questions (dots). The table puts the two side by side:
    accuracy, what is trained, the time per step, the memory a training step keeps alive (weights,
    saved activations, gradients and Adam's two moments, counted tensor by tensor) and what has to be
    stored afterwards.
    """),
    code(r"""
    if LORA == Path("runs/lora") and Path("runs/full/model.safetensors").is_file():
        FULL = Path("runs/full")
        print("using the full fine-tune `make lora-finetune` trained:", FULL)
    else:
        FULL = OUT / "full"
        full_cfg = dataclasses.replace(train_cfg, lr=finetune_defaults(full=True).lr)
        run_finetune(run_config["base"], FULL, None, full_cfg, sft_data=run_config["sft"]["train"],
                     sft_val=run_config["sft"]["val"], overwrite=True, progress=False)
    full_summary = load_json(FULL / "summary.json")

    train_examples, train_encoded, _ = fitting(tok, train_all[:256], base_model.config.context_length)
    step_batch = sft_batch(train_encoded, train_cfg.batch_size, tok.eot_id, train_cfg.seed, 0,
                           packing_context(base_model, tok.eot_id))
    memory = {name: training_memory(prepare_model(copy.deepcopy(base_model), cfg), step_batch, train_cfg)["total"]
              for name, cfg in (("lora", lora_cfg), ("full", None))}
    full_bytes = (FULL / "model.safetensors").stat().st_size

    table = [("exact match (held out)", f"{summary['accuracy']:.1%}", f"{full_summary['accuracy']:.1%}"),
             ("trainable parameters", f"{summary['trainable_params']:,}", f"{full_summary['trainable_params']:,}"),
             ("time per training step", f"{1e3 * summary['step_seconds']:.0f} ms", f"{1e3 * full_summary['step_seconds']:.0f} ms"),
             ("training memory (tensors)", f"{memory['lora'] / 2**20:.1f} MiB", f"{memory['full'] / 2**20:.1f} MiB"),
             ("what is stored afterwards", f"{adapter_bytes / 1024:.0f} KiB adapter", f"{full_bytes / 1024:.0f} KiB model")]
    print(f"{'':28s} {'LoRA':>18s} {'full fine-tune':>18s}")
    for name, a, b in table:
        print(f"{name:28s} {a:>18s} {b:>18s}")

    plot_finetune_loss({f"LoRA r={lora_cfg.r}": read_metrics(LORA / "metrics.jsonl"),
                        "full fine-tune": read_metrics(FULL / "metrics.jsonl")}, OUT / "finetune_loss.png")
    display(Image(filename=str(OUT / "finetune_loss.png")))
    """),
    md(r"""
    ## What to take away

    * LoRA trains a few percent of the parameters, needs less memory per training step, and leaves an
      adapter file a few percent the size of the model; many adapters can share one base.
    * Merged and unmerged adapters are the same function: their logits differ by float32 rounding,
      which shrinks by orders of magnitude in float64, and their greedy answers agree. Merging removes
      the adapter's cost at inference.
    * How close LoRA comes to full fine-tuning depends on the task, the base and the budget. Fine-tuning
      mostly teaches the format and reuses what the base already computes: on this base, which tracks
      the world well, both answer 90% or more of every kind of question; on an earlier version's
      base (sixteen names), which placed a moved person right only 82% of the time, both did worst on where a person
      is. LoRA needed more steps than full fine-tuning to catch up, and a rank above 8 did not help.
      `make lora-finetune` measures this with a rank sweep; the README reports the numbers.
    """),
]


# ---- registry ----------------------------------------------------------------------------------

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_tokenizer": TOKENIZER,
    "02_model": MODEL,
    "03_pretraining": PRETRAINING,
    "04_lora": LORA,
    "05_finetune_merge_compare": FINETUNE,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name` without outputs. Cell ids are fixed, so rebuilding changes nothing."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                   "language_info": {"name": "python"}}
    for i, (kind, text) in enumerate(NOTEBOOKS[name]):
        text = text.replace("NB_NAME", name)
        cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        cell.id = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def execute(nb: nbformat.NotebookNode, fast: bool, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run `nb` top to bottom, in place, in a fresh kernel of this very Python (sys.executable), with
    notebooks/ as the working directory and MICROLM_FAST set or cleared (and one thread when fast).
    Raises on the first error."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    env = {k: v for k, v in os.environ.items() if k != "MICROLM_FAST"}
    if fast:
        env["MICROLM_FAST"] = "1"
        # The fast setting is a check, often run beside other work: with one thread, torch never waits
        # for a busy second core (on a loaded 2-core machine that is ten times faster).
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        # A kernel spec of our own: a "python3" spec elsewhere on the machine could name another Python.
        spec = Path(tmp) / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python"}))
        # IPC sockets in the temporary folder: local only, and no warning about unencrypted TCP
        km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]),
                           transport="ipc", ip=str(Path(tmp) / "kernel"))
        client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                                resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        try:
            # cleanup_kc: nbclient keeps a kernel it did not create alive unless told otherwise
            client.execute(env=env, cleanup_kc=True)
        finally:
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write (and with --execute, run) the teaching notebooks.")
    parser.add_argument("names", nargs="*", help=f"notebooks to build (default: all of {', '.join(NOTEBOOKS)})")
    parser.add_argument("--execute", action="store_true",
                        help="run each notebook and save it with its outputs (MICROLM_FAST=1: the fast setting)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"unknown notebook(s) {unknown}; choose from {list(NOTEBOOKS)}")
    fast = os.environ.get("MICROLM_FAST") == "1"
    for name in args.names or NOTEBOOKS:
        nb, path = build(name), NOTEBOOK_DIR / f"{name}.ipynb"
        if args.execute:
            start = time.perf_counter()
            try:
                execute(nb, fast)
            except Exception as e:  # nbclient's CellExecutionError names the cell and holds the traceback
                print(f"{path.name}: failed, not written\n{e}", file=sys.stderr)
                return 1
            print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s "
                  f"({'fast' if fast else 'full'} setting)")
        nbformat.write(nb, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
