"""The story world: exact probabilities, an unambiguous grammar, a scorer that enforces the rules."""

import math
import random

import pytest

from microlm.world import (
    InvalidStory, World, enumerate_stories, entropy_stats, generate_splits, is_valid, log_prob,
    parse, render, restated_facts, sample_story, split_of, stored_facts,
)

TINY = World(female_names=("Ann",), male_names=("Tom", "Sam"), colours=("red", "blue"), kinds=("ball", "cup"),
             cast_size=2, stop_prob=0.4, max_events=2)


def test_tiny_world_probabilities_sum_to_one_over_every_story():
    stories = [s for _, s in enumerate_stories(TINY)]
    assert len(stories) > 200
    assert math.fsum(math.exp(s.log_prob) for s in stories) == pytest.approx(1.0, abs=1e-12)


def test_tiny_world_grammar_is_unambiguous():
    # Every choice sequence writes a different text, and parsing that text gives the choices back.
    seen = {}
    for choices, story in enumerate_stories(TINY):
        assert story.text not in seen
        seen[story.text] = choices
        parsed, _ = parse(TINY, story.text)
        assert parsed == choices
        assert log_prob(TINY, story.text) == pytest.approx(story.log_prob, abs=1e-12)


def test_sampled_stories_parse_back_to_their_choices_and_probability():
    rng, world = random.Random(1), World()
    for _ in range(300):
        story = sample_story(world, rng)
        choices, _ = parse(world, story.text)
        assert render(world, choices).text == story.text
        assert log_prob(world, story.text) == pytest.approx(story.log_prob, abs=1e-9)


@pytest.mark.parametrize("edit, pronouns", [
    (("passes from", "leaves"), False),   # an object where a person belongs
    ((" has a ", " holds a "), False),    # not the grammar
    (("He ", "Tom "), True),              # a name where the rule asks for a pronoun (or vice versa)
])
def test_scorer_rejects_texts_that_break_grammar_or_state(edit, pronouns):
    rng, world = random.Random(2), World(pronouns=pronouns)
    stories = [sample_story(world, rng).text for _ in range(400)]
    broken = [s.replace(*edit, 1) for s in stories if edit[0] in s]
    assert broken
    assert sum(is_valid(world, s) for s in broken) <= 0.1 * len(broken)  # a few edits stay valid by chance


def test_every_event_must_restate_the_state_it_changes():
    world = World()
    intro = "Ann has a red ball, Mia has a pink cup and Tom has a blue key, each at home."
    assert is_valid(world, intro + " The ball passes from Ann to Tom.")
    assert is_valid(world, intro + " Tom leaves Tom's house for Mia's house.")
    assert is_valid(world, intro + " Tom leaves Tom's house for Mia's house. Ann leaves Ann's house for Tom's house.")
    assert is_valid(world, intro + " The ball passes from Ann to Tom. The ball passes from Tom to Mia.")
    assert not is_valid(world, intro + " The ball passes from Tom to Ann.")  # Ann holds it
    assert not is_valid(world, intro + " The ball passes from Ann to Tom. The ball passes from Ann to Mia.")
    assert not is_valid(world, intro + " The ball passes from Ann to Ann.")  # not to oneself
    assert not is_valid(world, intro + " Tom leaves Mia's house for Ann's house.")  # he is at home
    assert not is_valid(world, intro + " Tom leaves Tom's house for Tom's house.")  # already there
    assert not is_valid(world, intro + " Tom leaves Tom's house for Sam's house.")  # Sam is not in the story
    # The default world names every mover; "She"/"He" is not in its grammar.
    assert is_valid(world, intro + " Tom leaves Tom's house for Mia's house. Tom leaves Mia's house for Ann's house.")
    assert not is_valid(world, intro + " Tom leaves Tom's house for Mia's house. He leaves Mia's house for Ann's house.")
    with pytest.raises(InvalidStory, match="char"):
        parse(world, intro + " The hat passes from Ann to Mia.")  # no hat in the story


def test_with_pronouns_a_move_by_the_last_person_named_says_she_or_he():
    world = World(pronouns=True)
    intro = "Ann has a red ball, Mia has a pink cup and Tom has a blue key, each at home."
    assert is_valid(world, intro + " Tom leaves Tom's house for Mia's house. Ann leaves Ann's house for Tom's house.")
    assert not is_valid(world, intro + " He leaves Tom's house for Mia's house.")  # no event yet: "He" is nobody
    assert not is_valid(world, intro + " Tom leaves Tom's house for Mia's house. Tom leaves Mia's house for Ann's house.")
    assert is_valid(world, intro + " Tom leaves Tom's house for Mia's house. He leaves Mia's house for Ann's house.")
    assert not is_valid(world, intro + " Tom leaves Tom's house for Mia's house. She leaves Mia's house for Ann's house.")
    # The receiver of an object becomes the one "She"/"He" refers to.
    assert is_valid(world, intro + " The cup passes from Mia to Ann. She leaves Ann's house for Tom's house.")
    assert not is_valid(world, intro + " The cup passes from Mia to Ann. Ann leaves Ann's house for Tom's house.")


def test_the_cast_and_their_objects_are_introduced_in_alphabetical_order():
    world = World()
    assert is_valid(world, "Ann has a red ball, Mia has a blue cup and Tom has a pink key, each at home. "
                           "Mia leaves Mia's house for Ann's house.")
    assert not is_valid(world, "Tom has a red ball, Ann has a blue cup and Mia has a pink key, each at home. "
                               "Mia leaves Mia's house for Ann's house.")
    assert not is_valid(world, "Ann has a red cup, Mia has a blue ball and Tom has a pink key, each at home. "
                               "Mia leaves Mia's house for Ann's house.")
    rng = random.Random(3)
    for _ in range(50):
        _, state = parse(world, sample_story(world, rng).text)
        assert state.cast == sorted(state.cast)


def test_same_seed_gives_identical_splits_and_splits_are_disjoint():
    a = generate_splits(World(), {"train": 300, "val": 20}, seed=7)
    b = generate_splits(World(), {"train": 300, "val": 20}, seed=7)
    assert [s.text for s in a["train"]] == [s.text for s in b["train"]]
    assert not {s.text for s in a["train"]} & {s.text for s in a["val"]}
    assert all(split_of(s.text) == "val" for s in a["val"])
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['test'\]"):  # no story would ever fill it
        generate_splits(World(), {"train": 5, "test": 1}, seed=7)


def test_entropy_stats_counts_the_newline_of_every_story():
    stories = [sample_story(TINY, random.Random(0)) for _ in range(3)]
    stats = entropy_stats(stories)
    assert stats["n_chars"] == sum(len(s.text) + 1 for s in stories)
    assert stats["bits_per_char"] == pytest.approx(sum(s.bits for s in stories) / stats["n_chars"])


def test_world_rejects_bad_configuration():
    with pytest.raises(ValueError, match="cast_size"):
        World(cast_size=1)
    with pytest.raises(ValueError, match="stop_prob"):
        World(stop_prob=1.0)


def test_from_dict_round_trips_and_refuses_a_world_of_another_story_program():
    world = World(cast_size=2, stop_prob=0.5)
    assert World.from_dict(world.to_dict()) == world
    old = {**world.to_dict(), "grammar": "0123456789ab"}
    with pytest.raises(ValueError, match="runs/x was trained on the story world of another microlm version"):
        World.from_dict(old, "runs/x")


def test_restated_facts_name_each_look_up_and_how_far_back_it_reaches():
    world = World(pronouns=True)  # a look-up through "She"/"He" too
    text = ("Ann has a red ball, Mia has a blue cup and Tom has a pink key, each at home. Tom leaves Tom's house "
            "for Mia's house. He leaves Mia's house for Ann's house. The cup passes from Mia to Ann. The cup "
            "passes from Ann to Tom. He leaves Ann's house for Tom's house. The ball passes from Ann to Mia.")
    facts = [(text[offset:].split(" ")[0], what, when) for offset, what, when in restated_facts(world, text)]
    assert facts == [
        ("Tom's", "place", "intro"),              # Tom has not moved: everyone starts at home
        ("Mia's", "place", "previous event"),     # "He" is Tom, who just went to Mia's house
        ("Mia", "holder", "intro"),
        ("Ann", "holder", "previous event"),
        ("Ann's", "place", "earlier event"),      # Tom's last move is two events back, past two gifts
        ("Ann", "holder", "intro"),
    ]
    with pytest.raises(InvalidStory):
        restated_facts(world, text.replace("He leaves Ann's house", "He leaves Mia's house"))


def test_stored_facts_name_where_each_event_sets_a_fact_and_its_key():
    world = World(pronouns=True)
    text = ("Ann has a red ball, Mia has a blue cup and Tom has a pink key, each at home. Tom leaves Tom's house "
            "for Mia's house. He leaves Mia's house for Ann's house. The cup passes from Mia to Ann. She leaves "
            "Ann's house for Tom's house.")
    facts = [(text[offset:].split(" ")[0].rstrip("."), what, key) for offset, what, key in stored_facts(world, text)]
    assert facts == [("Mia's", "place", "Tom"), ("Ann's", "place", "Tom"),  # "He" is Tom
                     ("Ann", "holder", "cup"), ("Tom's", "place", "Ann")]  # "She" is Ann, who just got the cup
