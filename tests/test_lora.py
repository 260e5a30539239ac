"""LoRA: the wrapper, applying it by name, merging (non-zero adapters), adapter files."""

import json

import pytest
import torch

from microlm.checkpoint import CheckpointError
from microlm.lora import (LoRALinear, apply_lora_to_model, load_adapter, lora_layers, merge_and_unload, merge_lora,
                          parameter_report, save_adapter, set_lora_enabled, unmerge_lora)
from microlm.model import GPT, GPTConfig

CFG = dict(vocab_size=40, context_length=16, d_model=32, n_layers=2, n_heads=4)


def base_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG)).to(dtype).eval()


def randomise_adapter(model, seed=1):
    # A fresh adapter has B = 0 and changes nothing: a merge test on it could not fail. A is drawn anew
    # too, so that two adapters differ in both (a loader that skipped A would show).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


X = torch.randint(0, 40, (3, 12))


def test_fresh_adapter_leaves_the_model_unchanged_and_trains_only_a_and_b():
    base = base_model()
    expected = base(X)
    model = apply_lora_to_model(base_model(), r=4, alpha=8)
    torch.testing.assert_close(model(X), expected, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_layers(model)) == 2 * 4  # q, k, v, output in each of 2 blocks
    model(X).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all((g != 0).any() for n, g in grads.items() if ".lora_B." in n)  # B learns from the first step
    assert all((g == 0).all() for n, g in grads.items() if ".lora_A." in n)  # A only once B has moved (B = 0)


def test_forward_is_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(8, 6, bias=False), r=2, alpha=6)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 8)
    manual = x @ layer.base.weight.T + 3.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), manual, atol=1e-6, rtol=0)
    # (batch, seq, d_in) with a bias, and the gradients of A and B, in float64: within 1e-12
    layer = LoRALinear(torch.nn.Linear(8, 6).double(), r=2, alpha=6)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    manual = layer.base(x) + 3.0 * (x @ a.T @ b.T)
    grad = torch.randn(manual.shape, dtype=torch.float64)
    expected = torch.autograd.grad(manual, (a, b), grad)
    out = layer(x)
    torch.testing.assert_close(out, manual, atol=1e-12, rtol=0)
    for got, want in zip(torch.autograd.grad(out, (a, b), grad), expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert LoRALinear(torch.nn.Linear(8, 6), r=4, alpha=8, use_rslora=True).scaling == pytest.approx(4.0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merged_equals_unmerged_and_differs_from_the_base(dtype, atol):
    model = apply_lora_to_model(base_model(dtype=dtype), r=4, alpha=8)
    randomise_adapter(model)
    unmerged = model(X)
    assert (unmerged - base_model(dtype=dtype)(X)).abs().max() > 1e-2  # the adapter does something
    merge_lora(model)
    torch.testing.assert_close(model(X), unmerged, atol=atol, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)  # W + d - d is W only up to rounding
    torch.testing.assert_close(model(X), unmerged, atol=atol, rtol=0)


def test_a_merged_weight_is_the_exact_sum_rounded_once():
    """W + scale * B @ A is summed in float64 and rounded to fp32 once: the nearest fp32 weights to
    the exact merged ones (fp32 arithmetic would round B @ A and the sum separately)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 48, bias=False), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # a large delta, as long fine-tuning makes
    exact = layer.base.weight.double() + 2.0 * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    in_fp32 = layer.base.weight + 2.0 * (layer.lora_B.weight @ layer.lora_A.weight)
    layer.merge()
    assert torch.equal(layer.base.weight, exact.float())
    assert not torch.equal(in_fp32, exact.float())  # so the check above can tell the two apart


def test_merge_and_unload_gives_a_plain_model_with_the_same_function():
    model = apply_lora_to_model(base_model(), r=2, alpha=4)
    randomise_adapter(model)
    expected = model(X)
    plain = merge_and_unload(model)
    assert not lora_layers(plain)
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(plain(X), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), 1e20])  # 1e20: finite in float64, overflows fp32 when merged
def test_a_non_finite_merge_is_refused_before_any_weight_changes(bad):
    model = apply_lora_to_model(base_model(), r=2, alpha=4)
    randomise_adapter(model)
    layers = list(lora_layers(model).values())
    before = [layer.base.weight.clone() for layer in layers]
    with torch.no_grad():
        layers[-1].lora_A.weight.fill_(bad)
        layers[-1].lora_B.weight.fill_(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        layers[-1].merge()
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_lora(model)  # the last layer is bad: the earlier ones must not have been merged either
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_and_unload(model)  # nor merged and swapped back to nn.Linear
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(layers, before))
    assert not any(layer.merged for layer in layers) and lora_layers(model) == dict(zip(lora_layers(model), layers))


def test_disabling_the_adapter_gives_the_base_function():
    model = apply_lora_to_model(base_model(), r=2, alpha=4)
    randomise_adapter(model)
    set_lora_enabled(model, False)
    torch.testing.assert_close(model(X), base_model()(X), atol=0, rtol=0)
    # merging would fold in the delta the model does not apply: refused, with nothing changed
    before = [layer.base.weight.clone() for layer in lora_layers(model).values()]
    for merge in (merge_lora, merge_and_unload, lambda m: next(iter(lora_layers(m).values())).merge()):
        with pytest.raises(RuntimeError, match="switched off"):
            merge(model)
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(lora_layers(model).values(), before))
    set_lora_enabled(model, True)
    merge_lora(model)
    assert (model(X) - base_model()(X)).abs().max() > 1e-2


def test_bad_targets_and_ranks_name_what_exists():
    with pytest.raises(ValueError, match=r"unknown LoRA target.*\['o_proj'\].*output_proj"):
        apply_lora_to_model(base_model(), targets=("q_proj", "o_proj"))
    with pytest.raises(ValueError, match=r"r must be in \[1, 32\]"):
        apply_lora_to_model(base_model(), r=33)
    with pytest.raises(ValueError, match="r must be"):
        apply_lora_to_model(base_model(), r=0)


def test_a_tied_lm_head_is_refused_and_an_untied_one_merges_into_itself_only():
    model = base_model()
    assert model.lm_head.weight is model.tok_emb.weight  # tied: merging into lm_head would change the embedding
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with tok_emb\.weight"):
        apply_lora_to_model(model, targets=("q_proj", "lm_head"))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # refused before any change
    torch.manual_seed(0)
    untied = GPT(GPTConfig(**{**CFG, "tie_embeddings": False})).eval()
    embedding = untied.tok_emb.weight.clone()
    apply_lora_to_model(untied, targets=("q_proj", "lm_head"), r=2, alpha=4)
    randomise_adapter(untied)
    expected = untied(X)
    merge_lora(untied)
    torch.testing.assert_close(untied(X), expected, atol=1e-5, rtol=0)
    assert torch.equal(untied.tok_emb.weight, embedding)


def test_parameter_report():
    model = apply_lora_to_model(base_model(), targets=("q_proj", "v_proj"), r=2, alpha=4)
    trainable = 2 * 2 * (2 * 32 * 2)  # 2 blocks x 2 targets x (A + B)
    assert f"trainable params: {trainable:,} ||" in parameter_report(model)


def test_adapter_round_trip_and_hot_swap(tmp_path):
    model = apply_lora_to_model(base_model(), r=2, alpha=4)
    randomise_adapter(model, seed=1)
    out_1 = model(X)
    config = save_adapter(model, tmp_path / "a1")
    assert config["n_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    randomise_adapter(model, seed=2)
    out_2 = model(X)
    save_adapter(model, tmp_path / "a2")
    load_adapter(model, tmp_path / "a1")  # switch adapters without reloading the base
    torch.testing.assert_close(model(X), out_1, atol=0, rtol=0)
    load_adapter(model, tmp_path / "a2")
    torch.testing.assert_close(model(X), out_2, atol=0, rtol=0)
    # a merged model is refused before anything is written: the folder keeps its adapter
    files = {p.name: p.read_bytes() for p in (tmp_path / "a1").iterdir()}
    randomise_adapter(model, seed=3)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        save_adapter(model, tmp_path / "a1")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a1").iterdir()} == files


def test_adapters_for_another_base_rank_or_targets_are_refused(tmp_path):
    model = apply_lora_to_model(base_model(), r=2, alpha=4)
    randomise_adapter(model)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(apply_lora_to_model(base_model(seed=5), r=2, alpha=4), tmp_path / "a")
    with pytest.raises(CheckpointError, match="r=2"):
        load_adapter(apply_lora_to_model(base_model(), r=4, alpha=4), tmp_path / "a")
    with pytest.raises(CheckpointError, match="targets"):
        load_adapter(apply_lora_to_model(base_model(), targets=("q_proj",), r=2, alpha=4), tmp_path / "a")
    with pytest.raises(CheckpointError, match="alpha=4"):  # same shapes, another scale: would load silently
        load_adapter(apply_lora_to_model(base_model(), r=2, alpha=8), tmp_path / "a")
    with pytest.raises(CheckpointError, match="use_rslora=False"):
        load_adapter(apply_lora_to_model(base_model(), r=2, alpha=4, use_rslora=True), tmp_path / "a")
    merged = apply_lora_to_model(base_model(), r=2, alpha=4)
    merge_lora(merged)
    with pytest.raises(RuntimeError, match="unmerge the current adapter"):
        load_adapter(merged, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_adapter(model, tmp_path / "a")
    assert cfg["r"] == 2
