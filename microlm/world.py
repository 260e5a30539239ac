"""The story world: short stories whose probability is known exactly.

A story is written by one small program, `_tell`, that makes random choices (who is in the story,
where each person is, what they hold, what they do, when to stop) and writes text as it goes. Every
choice is uniform over the options that are *valid in the current world state* (you can only give
away what you hold), except the stop choice, which is a coin with probability `stop_prob`.

The same program is driven three ways:
  * `_Sampler` draws the choices at random: the corpus generator;
  * `_Parser` reads a text and finds, at every choice, the one option the text continues with:
    the scorer. A text that breaks the grammar or the world state has no matching option and
    scores -inf;
  * `_Replayer` follows a fixed list of choices: used to enumerate every story of a tiny world.

Because the parser recovers the choices from the text, two different choice sequences can never
write the same text (the grammar is unambiguous), so `log p(text)` is the probability of the text,
not only of one way to write it. The mean of -log2 p(story) over a sample, divided by its characters,
is therefore a lower bound, in bits per character, on the cross-entropy of any model of these stories.

Each option's text ends in a delimiter (a space, a full stop or the newline), so no option is a prefix
of another: the parser never needs to look ahead.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import random
import re
from dataclasses import dataclass, field, fields
from typing import Iterator

NEWLINE = "\n"  # ends every story; the stop choice writes it, so it counts as a character


@dataclass(frozen=True)
class World:
    """The vocabulary and the dynamics of the story world. The defaults are the corpus world."""

    female_names: tuple[str, ...] = ("Ann", "Eva", "Mia")
    male_names: tuple[str, ...] = ("Ben", "Sam", "Tom")
    colours: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
    kinds: tuple[str, ...] = ("ball", "cup", "key")  # as many as the cast: every story has all three
    cast_size: int = 3  # people per story; each starts with one object of a distinct kind
    stop_prob: float = 0.35  # after each event, the story ends with this probability ...
    max_events: int = 20  # ... and always after this many events (keeps stories inside the context)
    pronouns: bool = False  # True: a move by the last person named says "She"/"He" instead of the name

    def __post_init__(self):
        words = self.female_names + self.male_names + self.colours + self.kinds
        if len(set(words)) != len(words) or not all(w.isalpha() for w in words):
            raise ValueError("World: names, colours and kinds must be distinct alphabetic words")
        if {"She", "He"} & set(self.female_names + self.male_names):
            raise ValueError("World: 'She' and 'He' are pronouns, not names")
        n_people = len(self.female_names) + len(self.male_names)
        if not 2 <= self.cast_size <= min(n_people, len(self.kinds)):
            raise ValueError(f"World: cast_size must be in [2, {min(n_people, len(self.kinds))}], got {self.cast_size}")
        if not self.colours:
            raise ValueError("World: needs at least 1 colour")
        if not 0 < self.stop_prob < 1:
            raise ValueError(f"World: stop_prob must be in (0, 1), got {self.stop_prob}")
        if self.max_events < 1:
            raise ValueError(f"World: max_events must be >= 1, got {self.max_events}")

    @property
    def names(self) -> tuple[str, ...]:
        return self.female_names + self.male_names

    def pronoun(self, name: str) -> str:
        return "She" if name in self.female_names else "He"

    def to_dict(self) -> dict:
        # "grammar" fingerprints the story program itself, so files written by an older grammar with
        # the same settings are never mistaken for current ones (data.build_story_corpus compares it).
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "grammar": grammar_fingerprint()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "the run") -> "World":
        """The world a run's config.json recorded. Refused when another version of the story program
        wrote it: those stories read differently, so the run's model would be scored and questioned
        on text it never saw."""
        if d.get("grammar") != grammar_fingerprint():
            raise ValueError(f"{source} was trained on the story world of another microlm version (grammar "
                             f"{d.get('grammar')}, this version's: {grammar_fingerprint()}); train it again with "
                             "this version, e.g. `make pretrain ARGS=--overwrite`")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "grammar"})


@dataclass
class StoryState:
    """What is true at the end of a story (used to ask questions about it)."""

    cast: list[str] = field(default_factory=list)
    place_of: dict[str, str] = field(default_factory=dict)  # person -> whose house they are in
    colour_of: dict[str, str] = field(default_factory=dict)  # kind -> colour
    holder: dict[str, str] = field(default_factory=dict)  # kind -> person who holds it now
    gifts: list[tuple[str, str, str]] = field(default_factory=list)  # (giver, kind, receiver) in order
    n_events: int = 0


def _tell(world: World, d) -> StoryState:
    """The story program. `d` is a driver with `emit(text)` and `choose(options, probs=None) -> index`."""
    s = StoryState()
    # Everyone starts at home: "Ann has a red ball, Mia has a blue cup and Tom has a pink key, each at
    # home." The cast and their objects come in alphabetical order: no name or kind can repeat, and
    # checking that needs only the previous one.
    order, kinds = sorted(world.names), sorted(world.kinds)
    last = world.cast_size - 1
    for slot in range(world.cast_size):
        first = order.index(s.cast[-1]) + 1 if s.cast else 0
        free = order[first: len(order) - (last - slot)]  # leave room for the rest
        name = free[d.choose([n + " has a " for n in free])]
        colour = world.colours[d.choose([c + " " for c in world.colours])]
        first = kinds.index(list(s.holder)[-1]) + 1 if s.holder else 0
        free_kinds = kinds[first: len(kinds) - (last - slot)]
        end = ", each at home." if slot == last else " and " if slot == last - 1 else ", "
        kind = free_kinds[d.choose([k + end for k in free_kinds])]
        s.cast.append(name)
        s.colour_of[kind], s.holder[kind] = colour, name
    # The places are the cast's houses: restating where someone is means writing a name, as restating
    # who holds an object does (with eight named places that look-up failed; see the README). Starting
    # at home, someone who has not moved leaves their own house: no shared start place for the model
    # to fall back on, so it has to notice every move (with one shared start house it mostly did not).
    for name in s.cast:
        s.place_of[name] = name
    d.emit(" ")

    # Every event restates the state it changes ("leaves Mia's house", "from Tom"), so writing it
    # correctly needs one look-up of the story so far: where the person went last, who got the object last.
    focus = None  # the person the last event ended on; a move by them says "She"/"He"
    while True:
        movers = [world.pronoun(p) if p == focus and world.pronouns else p for p in s.cast]
        options = [f"{w} leaves " for w in movers] + [f"The {k} passes from " for k in s.holder]
        i = d.choose(options)
        if i < len(s.cast):  # "She leaves Mia's house for Tom's house."
            actor = focus = s.cast[i]
            d.emit(s.place_of[actor] + "'s house for ")
            houses = [p for p in s.cast if p != s.place_of[actor]]
            s.place_of[actor] = houses[d.choose([p + "'s house." for p in houses])]
        else:  # "The ball passes from Tom to Ann."
            kind = list(s.holder)[i - len(s.cast)]
            giver = s.holder[kind]
            d.emit(giver + " to ")
            receivers = [p for p in s.cast if p != giver]
            s.holder[kind] = focus = receivers[d.choose([p + "." for p in receivers])]
            s.gifts.append((giver, kind, s.holder[kind]))
        s.n_events += 1
        if s.n_events == world.max_events:
            d.choose([NEWLINE])
            return s
        if d.choose([" ", NEWLINE], (1 - world.stop_prob, world.stop_prob)) == 1:
            return s


def grammar_fingerprint() -> str:
    """A short hash of `_tell`'s source: it changes whenever the story program does."""
    return hashlib.blake2b(inspect.getsource(_tell).encode(), digest_size=6).hexdigest()


# ---- drivers -----------------------------------------------------------------------------------


class _Sampler:
    def __init__(self, rng: random.Random):
        self.rng, self.parts, self.log_prob = rng, [], 0.0

    def emit(self, text):
        self.parts.append(text)

    def choose(self, options, probs=None):
        if probs is None:
            i = self.rng.randrange(len(options))
            self.log_prob -= math.log(len(options))
        else:
            i = 0 if self.rng.random() < probs[0] else 1
            self.log_prob += math.log(probs[i])
        self.parts.append(options[i])
        return i


class InvalidStory(ValueError):
    """The text breaks the grammar or the world state at character `pos`."""

    def __init__(self, text: str, pos: int, expected: list[str]):
        self.pos, self.expected = pos, expected
        shown = ", ".join(repr(e) for e in expected[:6]) + (", ..." if len(expected) > 6 else "")
        super().__init__(f"invalid story at char {pos} ({text[pos:pos + 20]!r}): expected one of {shown}")


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos, self.log_prob, self.choices = text, 0, 0.0, []

    def emit(self, text):
        if not self.text.startswith(text, self.pos):
            raise InvalidStory(self.text, self.pos, [text])
        self.pos += len(text)

    def choose(self, options, probs=None):
        matches = [i for i, o in enumerate(options) if self.text.startswith(o, self.pos)]
        if not matches:
            raise InvalidStory(self.text, self.pos, list(options))
        assert len(matches) == 1, f"ambiguous grammar at {self.pos}: {[options[i] for i in matches]}"
        i = matches[0]
        self.log_prob += math.log(probs[i]) if probs else -math.log(len(options))
        self.pos += len(options[i])
        self.choices.append(i)
        return i


class _Branch(Exception):
    def __init__(self, n_options):
        self.n_options = n_options


class _Replayer(_Sampler):
    """Follows a fixed list of choice indices; raises _Branch when the list runs out."""

    def __init__(self, choices: list[int]):
        super().__init__(rng=None)
        self.todo = list(choices)

    def choose(self, options, probs=None):
        if not self.todo:
            raise _Branch(len(options))
        i = self.todo.pop(0)
        self.log_prob += math.log(probs[i]) if probs else -math.log(len(options))
        self.parts.append(options[i])
        return i


# ---- public API --------------------------------------------------------------------------------


@dataclass
class Story:
    text: str  # one line, without the final newline
    log_prob: float  # natural log of its probability under the world

    @property
    def bits(self) -> float:
        return -self.log_prob / math.log(2)

    @property
    def n_chars(self) -> int:
        return len(self.text) + 1  # the newline that ends it is part of what a model must predict


def sample_story(world: World, rng: random.Random) -> Story:
    d = _Sampler(rng)
    _tell(world, d)
    return Story("".join(d.parts)[:-1], d.log_prob)


def parse(world: World, text: str) -> tuple[list[int], StoryState]:
    """The choices that wrote `text` (one story, with or without its final newline) and the final
    state. Raises InvalidStory naming the first character where the text leaves the world's rules."""
    text = text if text.endswith(NEWLINE) else text + NEWLINE
    d = _Parser(text)
    state = _tell(world, d)
    if d.pos != len(text):
        raise InvalidStory(text, d.pos, ["end of story"])
    return d.choices, state


_EVENT = re.compile(r"(?P<mover>\w+) leaves (?P<place>\w+)'s house for (?P<to>\w+)'s house\."
                    r"|The (?P<kind>\w+) passes from (?P<giver>\w+) to (?P<receiver>\w+)\.")


def _events(world: World, text: str):
    """For each event of a valid story: (its regex match, "place" or "holder", the key whose fact it
    changes: the person who moves, any `She`/`He` resolved, or the kind of the object that passes)."""
    parse(world, text)  # refuses a text that is not a story
    intro_end = text.index(". ") + 2 if ". " in text else len(text)
    focus = None  # the person the last event ended on: who `She`/`He` is, with pronouns
    for m in _EVENT.finditer(text, intro_end):
        if m["mover"]:
            focus = focus if m["mover"] in ("She", "He") else m["mover"]
            yield m, "place", focus
        else:
            yield m, "holder", m["kind"]
            focus = m["receiver"]


def restated_facts(world: World, text: str) -> list[tuple[int, str, str]]:
    """Where a valid story restates what it already said: (character offset, "place" or "holder",
    when the fact was stated) for the `Mia` of every `... leaves Mia's house` and the `Tom` of every
    `... passes from Tom`. "when" is "intro" (their own house, the first holder), "previous event"
    (the event just before set it) or "earlier event" (an older one: a real look-up past other events).
    These words are fixed by the story so far, so a model that tracks the world predicts them surely."""
    stated: dict[str, int] = {}  # person or kind -> index of the event that set its place or holder
    facts = []
    for i, (m, what, key) in enumerate(_events(world, text)):
        when = stated.get(key)
        offset = m.start("place") if what == "place" else m.start("giver")
        facts.append((offset, what, "intro" if when is None else "previous event" if when == i - 1 else "earlier event"))
        stated[key] = i
    return facts


def stored_facts(world: World, text: str) -> list[tuple[int, str, str]]:
    """Where a valid story sets a fact that a later event may restate: (character offset, "place" or
    "holder", key) for the `Ann` of every `... leaves Mia's house for Ann's house` (key: the person who
    moved) and the `Ann` of every `The cup passes from Tom to Ann` (key: `cup`). To restate the fact
    later, a model has to find this word by its key: who went there, which object changed hands."""
    return [(m.start("to") if what == "place" else m.start("receiver"), what, key)
            for m, what, key in _events(world, text)]


def log_prob(world: World, text: str) -> float:
    """Exact natural-log probability of one story; -inf if it is not a story this world can tell."""
    text = text if text.endswith(NEWLINE) else text + NEWLINE
    d = _Parser(text)
    try:
        _tell(world, d)
    except InvalidStory:
        return -math.inf
    return d.log_prob if d.pos == len(text) else -math.inf


def is_valid(world: World, text: str) -> bool:
    return log_prob(world, text) > -math.inf


def render(world: World, choices: list[int]) -> Story:
    """The story written by a complete list of choices (the inverse of `parse`)."""
    d = _Replayer(choices)
    _tell(world, d)
    if d.todo:
        raise ValueError(f"{len(d.todo)} choices left over after the story ended")
    return Story("".join(d.parts)[:-1], d.log_prob)


def enumerate_stories(world: World) -> Iterator[tuple[list[int], Story]]:
    """Every story the world can tell, depth first. Only sensible for tiny worlds."""
    stack = [[]]
    while stack:
        choices = stack.pop()
        d = _Replayer(choices)
        try:
            _tell(world, d)
        except _Branch as b:
            stack.extend(choices + [i] for i in reversed(range(b.n_options)))
            continue
        yield choices, Story("".join(d.parts)[:-1], d.log_prob)


# ---- the corpus --------------------------------------------------------------------------------

SPLIT_MODULUS = 32  # a story's split is a hash of its text, so equal texts always share a split


def split_of(text: str) -> str:
    """'val' (1/32 of stories), 'sft' (1/32, kept out of pretraining for the fine-tuning stage) or 'train'."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % SPLIT_MODULUS
    return {0: "val", 1: "sft"}.get(h, "train")


def generate_splits(world: World, sizes: dict[str, int], seed: int) -> dict[str, list[Story]]:
    """Draw stories i.i.d. with a seeded RNG and deal them into splits by hash until each split
    named in `sizes` is full. Deterministic: the same seed gives the same lists."""
    if unknown := sorted(set(sizes) - {"train", "val", "sft"}):
        raise ValueError(f"unknown split(s) {unknown}: split_of deals stories into 'train', 'val' and 'sft' only")
    rng = random.Random(seed)
    out = {name: [] for name in sizes}
    while any(len(out[k]) < n for k, n in sizes.items()):
        story = sample_story(world, rng)
        bucket = out.get(split_of(story.text))
        if bucket is not None and len(bucket) < sizes[split_of(story.text)]:
            bucket.append(story)
    return out


def entropy_stats(stories: list[Story]) -> dict:
    """The exact entropy of a sample of stories: bits per story and per character (newlines included)."""
    bits = sum(s.bits for s in stories)
    chars = sum(s.n_chars for s in stories)
    return {
        "n_stories": len(stories),
        "n_chars": chars,
        "bits_per_story": bits / len(stories),
        "bits_per_char": bits / chars,
    }
