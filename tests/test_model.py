"""The GPT: shapes, causality, RoPE, attention by hand, the KV cache, parameter counts, init, learning."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from microlm.model import GPT, GPTConfig, KVCache, RMSNorm, ShortConv, apply_rope, pick_device, rope_tables

TINY = dict(vocab_size=50, context_length=32, d_model=32, n_layers=2, n_heads=4)
CONV = dict(conv_kernel=4)  # ShortConvs before attention and before the feed-forward (off by default)


def with_random_convs(model: GPT) -> GPT:
    """ShortConv weights start at zero (the model is then a plain transformer): give them values, so a test
    of the convolution's path can fail."""
    for m in model.modules():
        if isinstance(m, ShortConv):
            nn.init.normal_(m.weight, std=0.5)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's waiting
    # threads made these tests ~100x slower. Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY)).eval()


def test_logits_have_shape_batch_seq_vocab(model):
    assert model(torch.randint(0, 50, (3, 7))).shape == (3, 7, 50)


def test_future_tokens_do_not_change_past_logits(model):
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8], atol=1e-6, rtol=0)
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])  # the change itself is seen


def cached_step_by_step(model, x, prefill):
    """Logits for x (batch, seq): a prefill of `prefill` tokens, then one token at a time."""
    cache = KVCache.for_model(model, batch_size=x.shape[0])
    steps = [model(x[:, :prefill], cache)]
    for t in range(prefill, x.shape[1]):
        steps.append(model(x[:, t: t + 1], cache))
        assert cache.length == t + 1
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("extra", [{}, {"qk_norm": False}, CONV])
def test_kv_cache_logits_equal_the_full_forward_at_every_step(extra):
    # Tolerance 1e-5 in fp32: the cached path sums the same products in a different order.
    # Every step is compared, so a position offset that drifts after the prefill shows up.
    torch.manual_seed(0)
    model = with_random_convs(GPT(GPTConfig(**TINY, **extra))).eval()
    x = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(cached_step_by_step(model, x, prefill=5), model(x), atol=1e-5, rtol=0)


def test_kv_cache_difference_is_rounding_float64_agrees_to_1e_12(model):
    model = model.double()
    x = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(cached_step_by_step(model, x, prefill=5), model(x), atol=1e-12, rtol=0)


def test_kv_cache_accepts_chunks_after_a_prefix(model):
    x = torch.randint(0, 50, (1, 16))
    cache = KVCache.for_model(model, batch_size=1)
    out = torch.cat([model(x[:, :6], cache), model(x[:, 6:11], cache), model(x[:, 11:], cache)], dim=1)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=0)


def test_kv_cache_refuses_to_overflow_and_keeps_its_length(model):
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    assert cache.length == 6
    for bad in (33, 0):  # 0 is refused too, not taken for "the whole context"
        with pytest.raises(ValueError, match="max_len"):
            KVCache.for_model(model, batch_size=1, max_len=bad)


def test_positions_beyond_the_context_are_refused(model):
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache.for_model(model, batch_size=1)
    model(torch.zeros(1, 30, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)


@pytest.mark.parametrize("extra", [{}, CONV])
def test_documents_do_not_see_each_other_and_the_cache_agrees(extra):
    torch.manual_seed(0)
    m = with_random_convs(GPT(GPTConfig(**TINY, **extra, eot_id=0))).eval()
    for start in (7, 1):  # a new document starts there (1: the earliest an end token can split a row)
        x = torch.randint(1, 50, (2, 20))
        x[:, start] = 0
        y = x.clone()
        y[:, :start] = (y[:, :start] + 1) % 49 + 1  # change only the first document
        torch.testing.assert_close(m(x)[:, start:], m(y)[:, start:], atol=1e-6, rtol=0)
    x[:, 7] = 0
    x[1, 13] = 0  # rows split into documents differently
    torch.testing.assert_close(cached_step_by_step(m, x, prefill=4), m(x), atol=1e-5, rtol=0)
    cache = KVCache.for_model(m, batch_size=2)
    torch.testing.assert_close(torch.cat([m(x[:, :5], cache), m(x[:, 5:], cache)], 1), m(x), atol=1e-5, rtol=0)


def test_float64_story_gives_the_same_logits_wherever_it_starts():
    """RoPE makes attention depend on distances only; in float64 the tables are computed in float64,
    so a story packed after another one gets its logits alone to rounding. (With the fp32 tables, as
    before, the absolute position showed: 2.7e-5 here.)"""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY, eot_id=0)).double().eval()
    for p in m.parameters():  # sharper attention than the init's, so positions matter
        p.data.mul_(4)
    story = torch.randint(1, 50, (1, 12))
    story[0, 0] = 0
    alone = m(story)
    packed = m(torch.cat([torch.randint(1, 50, (1, 17)), story], 1))[:, 17:]
    torch.testing.assert_close(packed, alone, atol=1e-12, rtol=0)


def test_short_conv_is_a_causal_depthwise_convolution_plus_its_input():
    torch.manual_seed(0)
    conv = ShortConv(8, kernel=3)
    nn.init.normal_(conv.weight)
    x = torch.randn(2, 7, 8)
    # F.conv1d with two zeros padded on the left: tap i meets x[t - 2 + i], as ShortConv's weight[i] does
    ref = x + F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), conv.weight.T[:, None, :], groups=8).transpose(1, 2)
    torch.testing.assert_close(conv(x), ref, atol=1e-6, rtol=0)
    # a window handed over by a cache (the kernel - 1 inputs before, then the new ones) gives the same
    # outputs as the whole sequence: for a chunk, and for one token (decoding's shortcut)
    torch.testing.assert_close(conv(x[:, 4:], past=x[:, 2:]), ref[:, 4:], atol=1e-6, rtol=0)
    torch.testing.assert_close(conv(x[:, 5:6], past=x[:, 3:6]), ref[:, 5:6], atol=1e-6, rtol=0)
    keep = torch.tensor([0.0, 1.0, 1.0]).expand(2, 1, 3)  # the input two back is in an earlier story
    torch.testing.assert_close(conv(x[:, 5:6], keep, past=x[:, 3:6]),
                               x[:, 5:6] + conv.weight[2] * x[:, 5:6] + conv.weight[1] * x[:, 4:5], atol=1e-6, rtol=0)


def test_a_new_short_conv_leaves_the_model_a_plain_transformer():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**TINY)).eval()
    convs = GPT(GPTConfig(**TINY, **CONV)).eval()
    missing, unexpected = convs.load_state_dict(plain.state_dict(), strict=False)
    assert all("_conv." in k for k in missing) and missing and not unexpected
    x = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(convs(x), plain(x), atol=1e-6, rtol=0)
    assert not torch.allclose(with_random_convs(convs)(x), plain(x))


@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 4, 6, 8)])
def test_rmsnorm_hand_written_backward_equals_autograd_on_the_formula(shape):
    # float64, so the only difference is the order of operations: within 1e-12
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1]).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(shape[-1], dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(shape, dtype=torch.float64)
    norm(x).backward(grad)
    mine = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    formula = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    formula.backward(grad)
    assert torch.allclose(mine[0], x.grad, rtol=0, atol=1e-12)
    assert torch.allclose(mine[1], norm.weight.grad, rtol=0, atol=1e-12)
    with torch.no_grad():  # the inference path is the plain formula
        assert torch.allclose(norm(x), formula, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x.detach()[..., :4, :].clone().requires_grad_(),))


def test_rope_preserves_norms_and_scores_depend_only_on_distance():
    cos, sin = rope_tables(8, 64, 10000.0)
    c, s = cos.double(), sin.double()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1, 8, dtype=torch.float64, generator=g) for _ in range(2))

    def at(x, pos):
        return apply_rope(x, c[pos: pos + 1], s[pos: pos + 1])
    # Tolerances 1e-6: the tables are stored in fp32 (about 7 significant digits).
    assert at(q, 17).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)
    for m, n, shift in [(10, 3, 30), (3, 10, 50), (5, 5, 21)]:
        score, shifted = (at(q, m) * at(k, n)).sum(), (at(q, m + shift) * at(k, n + shift)).sum()
        assert score.item() == pytest.approx(shifted.item(), abs=1e-6)
    assert (at(q, 10) * at(k, 3)).sum().item() != pytest.approx((q * k).sum().item(), abs=1e-3)  # it did rotate


def test_rope_turns_each_channel_pair_by_its_angle():
    # float64 tables and inputs: exact up to the order of operations, within 1e-12
    cos, sin = rope_tables(8, 16, 10000.0, torch.float64)
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # (b, heads, seq, hd)
    # pair (a, b) = channels (i, i + 4) at angle θ = position * 10000^(-2i/8) becomes (a cos - b sin, b cos + a sin)
    theta = torch.arange(16, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    a, b = x[..., :4], x[..., 4:]
    rotated = torch.cat([a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), rotated, rtol=0, atol=1e-12)


def test_attention_by_hand_equals_the_module(model):
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 32)
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    heads = lambda t: t.view(2, 9, 4, 8).transpose(1, 2)  # noqa: E731  (batch, heads, seq, head_dim)
    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)  # QK-norm, then RoPE
    scores = q @ k.transpose(-1, -2) * model.config.attn_scale / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(attn(x, cos, sin), attn.output_proj(y), atol=1e-6, rtol=0)


def test_param_counts_add_up_and_count_tied_weights_once():
    tied = GPT(GPTConfig(**TINY))
    counts = tied.param_counts()
    assert counts["total"] == sum(p.numel() for p in tied.parameters())  # parameters() yields a tied one once
    assert counts["lm_head"] == 0 and tied.lm_head.weight is tied.tok_emb.weight
    per_block_attn, per_block_mlp = 4 * 32 * 32, 3 * 32 * 96  # d_ff = 96 for d_model 32
    assert (counts["embedding"], counts["attention"], counts["mlp"]) == (50 * 32, 2 * per_block_attn, 2 * per_block_mlp)
    assert counts["norms"] == 2 * (2 * 32 + 2 * 8) + 32  # attn/mlp norms, q/k norms (head_dim 8), final norm
    assert "conv" not in counts  # listed only when there are ShortConvs
    assert GPT(GPTConfig(**TINY, **CONV)).param_counts()["conv"] == 2 * 2 * 4 * 32  # 2 blocks, 2 convs, k 4, d 32
    untied = GPT(GPTConfig(**TINY, tie_embeddings=False))
    assert untied.param_counts()["total"] == sum(p.numel() for p in untied.parameters())
    assert untied.param_counts()["total"] - counts["total"] == 50 * 32


def test_flops_per_token_is_6n_plus_12_l_d_t():
    for tie in (True, False):
        m = GPT(GPTConfig(**TINY, tie_embeddings=tie))
        n_matmul = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Linear))
        assert m.flops_per_token() == 6 * n_matmul + 12 * 2 * 32 * 32
        n_conv = 2 * 2 * 4 * 32  # a ShortConv weight does one multiply-add per token, like a matmul's
        assert GPT(GPTConfig(**TINY, **CONV, tie_embeddings=tie)).flops_per_token() == m.flops_per_token() + 6 * n_conv


def test_default_d_ff_is_8_thirds_of_d_model_rounded_up_to_32():
    assert GPTConfig(d_model=128).d_ff == 352  # 8/3 * 128 = 341.3
    assert GPTConfig(d_model=96).d_ff == 256
    assert GPTConfig(d_ff=100).d_ff == 100


def test_init_std_is_002_and_residual_projections_smaller():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=500, d_model=128, n_layers=4, n_heads=4))
    # rel=0.05: each matrix has >= 16k samples, so its std is within about 1% of the target.
    for w in (m.tok_emb.weight, m.blocks[0].attn.q_proj.weight, m.blocks[3].mlp.gate_proj.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (m.blocks[0].attn.output_proj.weight, m.blocks[3].mlp.down_proj.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert all((b.attn_norm.weight == 1).all() for b in m.blocks)


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=30, n_heads=4), "d_model"), (dict(d_model=12, n_heads=4), "d_model"),
    (dict(n_layers=0), "n_layers"), (dict(vocab_size=-1), "vocab_size"), (dict(d_ff=-5), "d_ff"),
    (dict(rope_base=0.0), "rope_base"), (dict(norm_eps=-1e-5), "norm_eps"), (dict(eot_id=512), "eot_id"),
    (dict(d_model="128"), "d_model"), (dict(conv_kernel=-1), "conv_kernel"),
    (dict(attn_scale=math.inf), "attn_scale"), (dict(rope_base=math.nan), "rope_base"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**kwargs)


def test_config_round_trips_and_from_dict_names_unknown_and_missing_keys():
    cfg = GPTConfig(**TINY, tie_embeddings=False)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="colour"):
        GPTConfig.from_dict({**cfg.to_dict(), "colour": 1})
    d = cfg.to_dict()
    del d["n_heads"]
    with pytest.raises(ValueError, match="missing.*n_heads"):
        GPTConfig.from_dict(d)
    older = GPTConfig(**TINY, **CONV).to_dict()
    del older["conv_kernel"]  # a model saved before ShortConv existed is a plain transformer
    assert GPTConfig.from_dict(older).conv_kernel == 0


def test_a_few_steps_of_adamw_learn_a_repeated_sequence():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY))
    x = torch.arange(17).repeat(2, 1) % 50
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(50), rel=0.05)  # small init: near-uniform predictions
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_device_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda' is not available.*available: cpu"):
        pick_device("cuda")
    assert pick_device("auto").type in ("cpu", "mps")
    assert pick_device("cpu") == torch.device("cpu")


def test_training_on_packed_stories_is_bit_reproducible_with_two_threads():
    # Runs that must end with the same weights (resume, seeds) need every op to add in a fixed order,
    # also across threads: a ShortConv fix-up with index_put(accumulate=True) broke this once.
    torch.set_num_threads(2)  # the module's fixture sets 1 again for the next module

    def train_a_little():
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=50, context_length=128, d_model=64, n_layers=2, n_heads=4, eot_id=0, **CONV))
        with_random_convs(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randint(1, 50, (16, 129), generator=g)
            x[:, ::20] = 0  # a story starts every 20 tokens
            F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(train_a_little(), train_a_little())
