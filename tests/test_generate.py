"""Sampling on top of the KV cache: greedy, temperature, top-k, top-p, end tokens, the context limit."""

import pytest
import torch

from microlm.generate import generate, sample_next, top_k_filter, top_p_filter
from microlm.model import GPT, GPTConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads; on a busy 2-core machine they made tests ~100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, context_length=24, d_model=32, n_layers=2, n_heads=2)).eval()


def greedy_by_full_forward(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:].tolist()


def test_greedy_with_and_without_cache_equals_an_argmax_loop(model):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = greedy_by_full_forward(model, prompt, 10)
    assert generate(model, prompt, 10, temperature=0) == expected
    assert generate(model, prompt, 10, temperature=0) == expected  # deterministic
    assert generate(model, prompt, 10, temperature=0, use_cache=False) == expected


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    prompt = torch.tensor([[7, 8], [9, 1]])
    greedy = generate(model, prompt, 8, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompt, 8, top_k=1, generator=g) == greedy
    assert generate(model, prompt, 8, top_p=1e-6, generator=g) == greedy
    assert generate(model, prompt, 8, temperature=5.0, top_k=1, generator=g) == greedy


def test_seeded_sampling_is_reproducible_and_the_cache_does_not_change_it(model):
    prompt = torch.tensor([[1]] * 4)
    a = generate(model, prompt, 12, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 12, generator=torch.Generator().manual_seed(3))
    c = generate(model, prompt, 12, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert a == b == c
    assert a != generate(model, prompt, 12, generator=torch.Generator().manual_seed(4))


def test_rows_stop_at_their_own_first_end_token_and_exclude_it(model):
    # The same seed without an end token gives the uncut rows: each row with eot_id must be that row cut
    # just before its first eot_id, whatever the other rows did.
    prompt = torch.tensor([[1]] * 16)
    full = generate(model, prompt, 20, temperature=3.0, generator=torch.Generator().manual_seed(0))
    eot = max(range(40), key=lambda t: sum(t in r for r in full[:8]))  # a token some rows produce
    assert 0 < sum(eot in r for r in full) < 16  # some rows end, others run to max_new_tokens
    cut = generate(model, prompt, 20, temperature=3.0, eot_id=eot, generator=torch.Generator().manual_seed(0))
    assert cut == [r[: r.index(eot)] if eot in r else r for r in full]


def test_generation_stops_when_every_row_has_ended(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    first = generate(model, torch.tensor([[3, 4]]), 1, temperature=0)[0][0]
    calls.clear()
    assert generate(model, torch.tensor([[3, 4]]), 15, temperature=0, eot_id=first) == [[]]
    assert len(calls) == 1  # the prefill only


def test_a_batch_stops_once_its_last_row_has_ended_even_if_an_earlier_one_went_on(model):
    # Row a draws the end token first and then goes on drawing others (its tokens are cut anyway); the
    # batch must stop at the step where row b draws it, not wait for a step where both draw it at once.
    prompt, draw = torch.tensor([[1], [2]]), lambda: torch.Generator().manual_seed(0)
    a, b = generate(model, prompt, 30, temperature=3.0, generator=draw())
    first = lambda row, t: row.index(t) if t in row else None  # noqa: E731
    eot = next(t for t in range(40) if None not in (first(a, t), first(b, t)) and first(a, t) != first(b, t)
               and [b, a][first(a, t) < first(b, t)][max(first(a, t), first(b, t))] != t)
    last = max(first(a, eot), first(b, eot))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    got = generate(model, prompt, 30, temperature=3.0, eot_id=eot, generator=draw())
    assert got == [a[: first(a, eot)], b[: first(b, eot)]]
    assert len(calls) == 1 + last  # the prefill, then one step for each token drawn before the last row's end


def test_generation_never_exceeds_the_context(model):
    for use_cache in (True, False):
        rows = generate(model, torch.tensor([[1, 2, 3, 4]]), 1000, temperature=0, use_cache=use_cache)
        assert len(rows[0]) == 24 - 4
    assert generate(model, torch.ones(1, 24, dtype=torch.long), 5) == [[]]


def test_training_mode_is_restored(model):
    model.train()
    generate(model, torch.tensor([[1]]), 3, temperature=0)
    assert model.training
    model.eval()
    generate(model, torch.tensor([[1]]), 3, temperature=0)
    assert not model.training


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]
    assert top_k_filter(logits, 99).isfinite().all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    assert top_p_filter(logits, 0.75).isfinite().tolist() == [[False, True, False, True]]  # 0.5 + 0.3 >= 0.75
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[False, True, False, False]]  # 0.5 reaches 0.5
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, top_p=0.75, generator=g).item() for _ in range(300)}
    assert picks == {1, 3}


def test_a_tiny_temperature_samples_the_most_likely_token():
    # logits / 1e-38 overflows to inf, and softmax of inf is NaN: the largest logit is moved to 0 first
    logits = torch.tensor([[10.0, 9.0, -3.0], [-1.0, 2.0, 1.5]])
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-38, 1e-4):
        assert sample_next(logits, temperature=temperature, generator=g).tolist() == [0, 1]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan"))])
def test_bad_sampling_arguments_are_refused(model, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        sample_next(torch.zeros(1, 5), **kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate(model, torch.tensor([[1]]), 0, **kwargs)  # refused even when nothing would be sampled


@pytest.mark.parametrize("prompt", [torch.tensor([1, 2]), torch.zeros(2, 0, dtype=torch.long),
                                    torch.ones(1, 25, dtype=torch.long)])
def test_bad_prompts_are_refused(model, prompt):
    with pytest.raises(ValueError, match="prompt"):
        generate(model, prompt, 3)


def test_decode_with_fixed_tokens_does_greedy_decodings_work(model):
    # per_token_latency times `decode`: fed the model's own greedy tokens, its argmaxes are those tokens,
    # so it does what greedy generation does; fed other tokens, it still does one step per token.
    from microlm.evaluate import decode
    prompt = torch.tensor([[1, 2, 3]])
    tokens = generate(model, prompt, 10, temperature=0.0)[0]
    assert decode(model, prompt, tokens).tolist() == tokens
    assert len(decode(model, prompt, [5] * 10)) == 10


def test_per_token_latency_decodes_the_tokens_it_is_given(model, monkeypatch):
    import microlm.evaluate as evaluate
    decoded = []
    real = evaluate.decode
    monkeypatch.setattr(evaluate, "decode", lambda m, p, tokens: decoded.append(list(tokens)) or real(m, p, tokens))
    prompt = torch.tensor([[1, 2, 3]])
    evaluate.per_token_latency({"a": model, "b": model}, prompt, n_tokens=10, repeats=2, tokens=[5, 6, 7])
    assert decoded and all(t == [5, 6, 7] for t in decoded)
    decoded.clear()
    evaluate.per_token_latency({"a": model}, prompt, n_tokens=10, repeats=1)  # default: the greedy continuation
    assert decoded and all(t == generate(model, prompt, 10, temperature=0.0)[0] for t in decoded)


class Oracle(torch.nn.Module):
    """Teacher-forced "model" whose top choice at every position is the token that follows (or, with
    wrong=True, never is): lookup_accuracy must then report 100% (or 0%) everywhere."""

    def __init__(self, vocab_size, wrong=False):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, context_length=256, d_model=8, n_layers=1, n_heads=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.wrong = wrong

    def forward(self, idx):
        following = torch.cat([idx[:, 1:], idx[:, :1]], dim=1)
        logits = torch.nn.functional.one_hot(following, self.config.vocab_size).float()
        return -logits if self.wrong else logits


def test_lookup_accuracy_counts_every_restated_fact_by_kind():
    from microlm.evaluate import lookup_accuracy
    from microlm.tokenizer import EOT, Tokenizer, train_bpe
    from microlm.world import World, restated_facts, sample_story
    import random
    world, rng = World(), random.Random(3)
    stories = [sample_story(world, rng).text for _ in range(40)]
    tok = Tokenizer.from_bpe(train_bpe(EOT.join(stories), 1000))  # every word one token: no story is too long
    right = lookup_accuracy(Oracle(tok.n_vocab), tok, world, stories)
    wrong = lookup_accuracy(Oracle(tok.n_vocab, wrong=True), tok, world, stories)
    assert sum(v["total"] for v in right.values()) == sum(len(restated_facts(world, s)) for s in stories)
    assert {v["accuracy"] for v in right.values()} == {1.0} and {v["accuracy"] for v in wrong.values()} == {0.0}
    assert {"place, intro", "place, earlier event", "holder, intro"} <= set(right)


def test_probe_accuracy_reads_what_is_there_and_not_what_is_not():
    from microlm.evaluate import probe_accuracy
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    noise = torch.randn(400, 16, generator=g)
    written = noise.clone()
    written[:, :4] += 4 * torch.nn.functional.one_hot(labels, 4)  # the label is in the features
    assert probe_accuracy(written, labels) >= 0.95
    assert probe_accuracy(noise, labels) <= 0.45  # chance is 0.25 (80 held-out rows: 0.45 is 4 sd above)


def test_hidden_states_are_the_residual_stream_the_head_reads(model):
    from microlm.evaluate import hidden_states
    ids = torch.randint(0, 40, (1, 10))
    h = hidden_states(model, ids)
    assert h.shape == (2, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.final_norm(h[-1])), model(ids)[0], atol=1e-5, rtol=0)


class SentenceBag(torch.nn.Module):
    """A stand-in model whose one block writes, at every position, the sentence's first word and the
    words of the sentence so far (or, with current_only, just the current word): the key of a fact
    (the mover, who opens a move; the object, the only kind in a pass) is there in one and not the other."""

    def __init__(self, vocab_size, dot_id, current_only=False):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, context_length=4096)  # no story is skipped
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()])
        self.vocab_size, self.dot_id, self.current_only = vocab_size, dot_id, current_only
        self.device_anchor = torch.nn.Parameter(torch.zeros(0))  # where the evaluation code finds the device

    def forward(self, idx):
        onehot = torch.nn.functional.one_hot(idx[0], self.vocab_size).float()
        if not self.current_only:
            sentence = torch.cumsum(torch.cat([torch.zeros(1), (idx[0] == self.dot_id).float()[:-1]]), 0)
            same = (sentence[:, None] == sentence[None, :]).tril().float()
            first = onehot[same.argmax(1)]  # argmax finds each row's first 1: the sentence's first token
            onehot = torch.cat([first, same @ onehot], dim=1)
        return self.blocks[0](onehot[None])


def test_key_probes_find_a_key_only_where_the_model_wrote_it():
    import random
    from microlm.evaluate import key_probes
    from microlm.tokenizer import EOT, Tokenizer, train_bpe
    from microlm.world import World, sample_story, stored_facts
    world, rng = World(pronouns=False), random.Random(5)  # every move names its mover in its sentence
    stories = [sample_story(world, rng).text for _ in range(300)]
    tok = Tokenizer.from_bpe(train_bpe(EOT.join(stories), 300))
    dot = tok.encode_ordinary(".")[0]
    there = key_probes(SentenceBag(tok.n_vocab, dot), tok, world, stories)
    absent = key_probes(SentenceBag(tok.n_vocab, dot, current_only=True), tok, world, stories)
    assert there["place"]["n"] == sum(w == "place" for s in stories for _, w, _ in stored_facts(world, s))
    for what in ("place", "holder"):
        assert there[what]["by_layer"][0] >= 0.9  # the mover's name / the object's kind is in the sentence
        assert absent[what]["by_layer"][0] <= absent[what]["chance"] + 0.15  # the destination alone says nothing


def test_key_probes_read_the_word_that_sets_the_fact(monkeypatch):
    # With a stand-in that writes only the current token, the features the probe gets must be the
    # tokens of the destinations and receivers themselves: an off-by-one position would show here.
    import random
    import microlm.evaluate as ev
    from microlm.tokenizer import EOT, Tokenizer, train_bpe
    from microlm.world import World, sample_story, stored_facts
    world, rng = World(), random.Random(7)
    stories = [sample_story(world, rng).text for _ in range(60)]
    tok = Tokenizer.from_bpe(train_bpe(EOT.join(stories), 1000))  # merges until every word is one token
    seen = []
    monkeypatch.setattr(ev, "probe_accuracy", lambda x, labels: seen.append(x) or 0.0)
    ev.key_probes(SentenceBag(tok.n_vocab, tok.encode_ordinary(".")[0], current_only=True), tok, world, stories)
    assert len(seen) == 2  # one block, two kinds of fact
    for what, features in zip(("place", "holder"), seen):
        words = [story[offset:].split(".")[0].split(" ")[0].split("'")[0] for story in stories
                 for offset, w, _ in stored_facts(world, story) if w == what]
        read = [tok.decode([i]) for i in features.argmax(-1).tolist()]  # (facts, d): one call per block
        assert read == [" " + w for w in words]
