"""The fine-tuning set: questions about stories, and the loss mask that trains only on answers.

An example is a prompt (a story and a question) and a response (the exact answer):

    prompt:   "Ann has a red ball, ... each at home. ... The ball passes from Ann to Tom.\\nQ: Who has the red ball?\\nA:"
    response: " Tom"

Its tokens are `<|endoftext|> prompt response <|endoftext|>`. The loss is taken only where the
*target* is a response token or the final end token: with targets shifted by one, the first answer
token is predicted from the last prompt position, so the mask is built on target positions.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import IGNORE
from .world import StoryState, World, parse, sample_story, split_of

QUESTION_KINDS = ("who_has", "where_is", "who_gave")


def questions(state: StoryState) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every question the story answers unambiguously."""
    out = []
    for kind_ in state.holder:  # needs the object's colour (intro) and its last holder (events)
        out.append(("who_has", f"Who has the {state.colour_of[kind_]} {kind_}?", f" {state.holder[kind_]}"))
    for person in state.cast:  # needs the person's last move, through any She/He
        out.append(("where_is", f"Where is {person}?", f" at {state.place_of[person]}'s house"))
    received = [(k, r) for _, k, r in state.gifts]
    for giver, kind_, receiver in state.gifts:  # asked only when that person got that object once
        if received.count((kind_, receiver)) == 1:
            out.append(("who_gave", f"Who gave {receiver} the {state.colour_of[kind_]} {kind_}?", f" {giver}"))
    return out


def question_fingerprint() -> str:
    """A short hash of the code that writes questions and prompts: a question file written by other code
    is never mistaken for a current one (finetune.build_sft_data compares it)."""
    source = inspect.getsource(questions) + inspect.getsource(make_sft_set)
    return hashlib.blake2b(source.encode(), digest_size=6).hexdigest()


def sft_split(text: str) -> str:
    """'val' for 1 story in 10 of the fine-tuning stories, 'train' for the rest (by a second hash)."""
    h = hashlib.blake2b(text.encode(), digest_size=8, person=b"microlm-sft").digest()
    return "val" if int.from_bytes(h, "little") % 10 == 0 else "train"


def make_sft_set(world: World, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Questions about stories that the pretraining corpus never holds (split_of(text) == 'sft').
    Each story gives one question; its kind is drawn uniformly among the kinds it can answer."""
    rng = random.Random(seed)
    out = {name: [] for name in sizes}
    seen = set()
    while any(len(out[k]) < n for k, n in sizes.items()):
        story = sample_story(world, rng)
        if split_of(story.text) != "sft" or story.text in seen:
            continue
        seen.add(story.text)
        split = sft_split(story.text)
        if split not in out or len(out[split]) >= sizes[split]:
            continue
        _, state = parse(world, story.text)
        qs = questions(state)
        kind = rng.choice(sorted({k for k, _, _ in qs}))
        _, q, a = rng.choice([x for x in qs if x[0] == kind])
        out[split].append({"prompt": f"{story.text}\nQ: {q}\nA:", "response": a, "kind": kind})
    return out


# ---- files -------------------------------------------------------------------------------------


class SFTDataError(ValueError):
    """A fine-tuning file that cannot be used; the message names the file and line."""


def read_sft_jsonl(path: str | Path) -> list[dict]:
    """One {"prompt": ..., "response": ...} object per line (other keys are kept); blank lines are skipped.
    Anything else is an SFTDataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: fine-tuning file not found; pass an existing JSONL file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is dropped
    except UnicodeDecodeError as e:
        raise SFTDataError(f"{path}: not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    examples = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number too long to convert
            raise SFTDataError(f"{path}, line {n}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict):
            raise SFTDataError(f'{path}, line {n}: expected an object {{"prompt": ..., "response": ...}}, '
                               f"got {type(obj).__name__}")
        if missing := [k for k in ("prompt", "response") if k not in obj]:
            raise SFTDataError(f'{path}, line {n}: expected an object with "prompt" and "response"; '
                               f"missing {missing}")
        if not all(isinstance(obj[k], str) and obj[k] for k in ("prompt", "response")):
            raise SFTDataError(f'{path}, line {n}: "prompt" and "response" must be non-empty strings')
        examples.append(obj)
    if not examples:
        raise SFTDataError(f"{path}: no examples; write one JSON object per line")
    return examples


# ---- tokens and the loss mask ------------------------------------------------------------------


@dataclass
class SFTBatch:
    inputs: torch.Tensor  # (batch, seq) token ids, padded with <|endoftext|>
    targets: torch.Tensor  # (batch, seq) next tokens where the loss is taken, IGNORE elsewhere


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids `<|endoftext|> prompt response <|endoftext|>` and the number of prompt tokens
    (the leading end token included)."""
    head = [tokenizer.eot_id] + tokenizer.encode_ordinary(prompt)
    return head + tokenizer.encode_ordinary(response) + [tokenizer.eot_id], len(head)


def encode_examples(tokenizer, examples: list[dict], context: int) -> tuple[list[tuple[list[int], int]], int]:
    """Encoded examples that fit the context, and how many were skipped because they do not:
    an example is never cut, since a cut answer would teach the wrong thing."""
    kept, skipped = [], 0
    for ex in examples:
        ids, n_prompt = encode_example(tokenizer, ex["prompt"], ex["response"])
        if len(ids) - 1 > context:
            skipped += 1
        else:
            kept.append((ids, n_prompt))
    return kept, skipped


def collate(encoded: list[tuple[list[int], int]], pad_id: int, context: int | None = None) -> SFTBatch:
    """Rows padded to the longest; targets are IGNORE on prompt and padding positions.

    With `context`, examples are packed: laid end to end in rows of at most `context` inputs, each in
    the first row with room (the end token closing one example opens the next). The model's document
    mask (GPTConfig.eot_id) keeps them from seeing each other, and a batch pads far less: 16 questions
    of 80 tokens on average pad to the longest of them, about 154, one per row. Without `context`,
    one example per row."""
    rows_ids: list[list[int]] = []  # the tokens of each row
    rows_train: list[list[bool]] = []  # per row, whether target j (token j + 1) is trained on
    for ids, n_prompt in encoded:
        # target j is token j + 1: the answer starts at token n_prompt, i.e. at target n_prompt - 1
        train = [False] * (n_prompt - 1) + [True] * (len(ids) - n_prompt)  # one entry per target
        # Appended to a row, the example adds len(ids) - 1 tokens (its leading end token is the row's
        # last one) and as many inputs; a row of n tokens has n - 1 inputs.
        fits = [i for i, row in enumerate(rows_ids) if context and len(row) + len(ids) - 2 <= context]
        if fits:
            rows_ids[fits[0]].extend(ids[1:])
            rows_train[fits[0]].extend(train)  # the shared end token's target is this example's first
        else:
            rows_ids.append(list(ids))
            rows_train.append(train)
    t = max(len(ids) for ids in rows_ids) - 1
    x = torch.full((len(rows_ids), t), pad_id, dtype=torch.long)
    y = torch.full((len(rows_ids), t), IGNORE, dtype=torch.long)
    for i, (ids, train) in enumerate(zip(rows_ids, rows_train)):
        ids = torch.tensor(ids)
        x[i, : len(ids) - 1] = ids[:-1]
        y[i, : len(ids) - 1] = torch.where(torch.tensor(train), ids[1:], IGNORE)
    return SFTBatch(x, y)
