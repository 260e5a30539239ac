"""The fine-tuning set, its files, and the loss mask that trains only on answers."""

import json

import pytest
import torch

from microlm.data import IGNORE
from microlm.model import GPT, GPTConfig
from microlm.sft import (SFTDataError, collate, encode_example, encode_examples, make_sft_set, questions,
                         read_sft_jsonl)
from microlm.tokenizer import EOT, Tokenizer, train_bpe
from microlm.train import masked_loss
from microlm.world import World, generate_splits, parse

STORY = ("Ann has a red ball, Mia has a blue cup and Tom has a pink key, each at home. The ball passes from Ann "
         "to Tom. Tom leaves Tom's house for Mia's house. The cup passes from Mia to Tom. The ball passes from Tom to Mia.")


@pytest.mark.parametrize("world, story", [
    (World(), STORY),
    (World(pronouns=True), STORY.replace("Tom leaves", "He leaves")),  # the move through a pronoun
])
def test_answers_follow_the_state_across_sentences(world, story):
    _, state = parse(world, story)
    qa = {q: a for _, q, a in questions(state)}
    assert qa["Who has the red ball?"] == " Mia"  # Ann -> Tom -> Mia
    assert qa["Who has the blue cup?"] == " Tom"
    assert qa["Where is Tom?"] == " at Mia's house"
    assert qa["Where is Mia?"] == " at Mia's house"  # never moved: at home
    assert qa["Where is Ann?"] == " at Ann's house"
    assert qa["Who gave Tom the red ball?"] == " Ann"
    assert qa["Who gave Tom the blue cup?"] == " Mia"
    assert qa["Who gave Mia the red ball?"] == " Tom"


def test_fine_tuning_stories_are_never_in_pretraining_data_nor_in_both_splits():
    sft = make_sft_set(World(), {"train": 60, "val": 20}, seed=3)
    stories = {split: {ex["prompt"].split("\nQ:")[0] for ex in exs} for split, exs in sft.items()}
    assert not stories["train"] & stories["val"]
    pretrain = generate_splits(World(), {"train": 3000, "val": 100}, seed=3)
    assert not (stories["train"] | stories["val"]) & {s.text for v in pretrain.values() for s in v}
    assert {ex["kind"] for ex in sft["train"]} == {"who_has", "where_is", "who_gave"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_bpe(train_bpe(EOT.join([STORY] * 5 + ["Q: Who has A: Where is at the"]), 320))


def test_only_answer_positions_receive_gradient(tok):
    encoded = [encode_example(tok, STORY + "\nQ: Who has the red ball?\nA:", " Mia"),
               encode_example(tok, "Ann is at the park with a red ball.\nQ: Where is Ann?\nA:", " at the park")]
    batch = collate(encoded, tok.eot_id)
    for row, (ids, n_prompt) in zip(batch.targets, encoded):
        # the first target taken is the first answer token, predicted from the last prompt position
        assert row[n_prompt - 1].item() == ids[n_prompt]
        assert (row[: n_prompt - 1] == IGNORE).all()
        assert row[len(ids) - 2].item() == tok.eot_id  # the end token is learned too
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, context_length=128, d_model=16, n_layers=1, n_heads=2))
    logits = model(batch.inputs)
    logits.retain_grad()
    masked_loss(logits, batch.targets).backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[batch.targets == IGNORE] == 0).all()  # exactly zero, not small
    assert (per_position[batch.targets != IGNORE] > 0).all()


def test_end_token_text_in_a_users_example_stays_text(tok):
    # Only the example's own boundaries are end tokens: the text "<|endoftext|>" inside a prompt or an
    # answer must not split it into documents (the document mask would hide the prompt from the answer).
    ids, n_prompt = encode_example(tok, f"Q: Who has {EOT} the ball?\nA:", f" Mia{EOT}")
    assert ids.count(tok.eot_id) == 2 and ids[0] == ids[-1] == tok.eot_id
    assert tok.decode(ids[1:n_prompt]) == f"Q: Who has {EOT} the ball?\nA:"
    assert tok.decode(ids[n_prompt:-1]) == f" Mia{EOT}"


def test_packed_examples_train_on_the_same_answers_with_the_same_loss(tok):
    """Packing several examples into one row changes nothing the model computes: the document mask keeps
    each example to itself, and RoPE depends only on distances, so the loss is the unpacked one."""
    prompts = [(STORY + "\nQ: Who has the red ball?\nA:", " Mia"), ("Ann has a red ball.\nQ: Who has it?\nA:", " Ann"),
               ("Tom leaves Tom's house.\nQ: Where is Tom?\nA:", " at Mia's house"), ("Q: Who?\nA:", " Tom")]
    encoded = [encode_example(tok, p, r) for p, r in prompts]
    longest = max(len(ids) for ids, _ in encoded) - 1
    packed, single = collate(encoded, tok.eot_id, context=longest + 12), collate(encoded, tok.eot_id)
    assert len(packed.inputs) < len(encoded) and packed.inputs.shape[1] <= longest + 12
    # the same answer tokens are trained on
    assert sorted(packed.targets[packed.targets != IGNORE].tolist()) == sorted(single.targets[single.targets != IGNORE].tolist())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, context_length=128, d_model=16, n_layers=2, n_heads=2,
                          eot_id=tok.eot_id)).double()
    loss_packed = masked_loss(model(packed.inputs), packed.targets).item()
    loss_single = masked_loss(model(single.inputs), single.targets).item()
    # float64 all the way (the loss too, and RoPE tables computed in float64): equal to rounding
    assert loss_packed == pytest.approx(loss_single, rel=1e-12)


def test_packing_fills_a_row_exactly_to_the_context():
    a, b = ([9, 1, 2, 9], 2), ([9, 3, 4, 5, 9], 3)  # 3 and 4 inputs alone; 7 inputs packed (one end token shared)
    assert collate([a, b], 9, context=7).inputs.tolist() == [[9, 1, 2, 9, 3, 4, 5]]
    assert collate([a, b], 9, context=7).targets.tolist() == [[IGNORE, 2, 9, IGNORE, IGNORE, 5, 9]]
    assert len(collate([a, b], 9, context=6).inputs) == 2


def test_examples_longer_than_the_context_are_skipped_and_counted(tok):
    kept, skipped = encode_examples(tok, [{"prompt": STORY, "response": " x"}, {"prompt": "A:", "response": " y"}],
                                    context=10)
    assert skipped == 1 and len(kept) == 1


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "response": ', "line 2: not valid JSON"),
    ('{"prompt": "a"}', 'line 2: expected an object with "prompt" and "response"'),
    ('{"prompt": "", "response": "b"}', "line 2: \"prompt\" and \"response\" must be non-empty strings"),
    ('[1, 2]', "line 2: expected an object"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "my.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + line + "\n")
    with pytest.raises(SFTDataError, match="my.jsonl, " + message.replace("(", r"\(").replace(")", r"\)")):
        read_sft_jsonl(path)


def test_masked_loss_keeps_float64_and_upcasts_half_precision():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 5, 7, dtype=torch.float64, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    targets[0, :2] = IGNORE
    loss = masked_loss(logits, targets)
    assert loss.dtype == torch.float64
    assert masked_loss(logits.bfloat16(), targets).dtype == torch.float32
    keep = targets != IGNORE
    by_hand = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-14)
