"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021).

A LoRALinear *holds* the original nn.Linear W (frozen) and adds a trainable low-rank path:

    y = W x + scaling * B(A(dropout(x)))      A: d_in -> r,  B: r -> d_out,  scaling = alpha / r

B starts at zero, so a fresh adapter leaves the model's function unchanged, and only A and B
(2 * d * r numbers instead of d * d) are trained. After training, the delta scaling * B @ A can be
added into W (`merge_lora`): the merged model has no extra cost at inference. Merging is an explicit
call, never a side effect of .eval(), and it is guarded against being applied twice.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import (CheckpointError, check_keys, fingerprint, load_json, read_tensors, save_json, save_tensors,
                         unique_tensors)
from .runs import sha256_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        max_r = min(base.in_features, base.out_features)
        if not 1 <= r <= max_r:
            raise ValueError(f"LoRA rank r must be in [1, {max_r}] for a {base.in_features}->{base.out_features} "
                             f"layer, got {r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        # rsLoRA (Kalajdzievski 2023) divides by sqrt(r) so the update's size does not shrink as r grows.
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapter starts as the identity change
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        y = self.base(x)
        if self.merged or not self.enabled:
            return y
        a = self.lora_A(self.dropout(x))  # (..., r)
        # y + scaling * B a in one call: addmm scales the small product inside the matmul and adds it to y
        # there, instead of two more passes over the (..., d_out) activations, forward and backward.
        rows = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, self.r), self.lora_B.weight.t(),
                           alpha=self.scaling)
        return rows.view(y.shape)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """scaling * B @ A, (d_out, d_in), computed in `dtype` (default: fp32, or float64 if the weights are)."""
        if dtype is None:
            dtype = torch.float64 if self.lora_A.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    def folded_weight(self, sign: int = 1) -> torch.Tensor:
        """W + sign * delta, without touching W: summed in float64 (fp32 on MPS, which has no float64)
        and rounded to W's dtype once, so a merged weight is the nearest value in that dtype to the exact
        sum. Summed in fp32, B @ A and the addition each round: with an adapter that moved weights by
        more than their own size (the sixteen-name world's), the merged model's logits then differed
        from the unmerged one's by 1.26e-4, above the 1e-4 target (README). Raises if the result holds NaN or Inf, overflow included."""
        w = self.base.weight
        wide = torch.float32 if w.device.type == "mps" else torch.float64
        new = (w.to(wide) + sign * self.delta_weight(wide)).to(w.dtype)
        if not torch.isfinite(new).all():
            raise ValueError("the LoRA delta holds NaN or Inf, or overflows the weights' dtype; "
                             "the base weights were left untouched")
        return new

    def check_mergeable(self) -> None:
        if self.merged:
            raise RuntimeError("the LoRA adapter is already merged; unmerge it first "
                               "(merging twice adds the delta twice)")
        if not self.enabled:
            raise RuntimeError("the adapter is switched off (set_lora_enabled(model, False)): merging would fold "
                               "in a delta the model does not apply; switch it on first, or do not merge")

    @torch.no_grad()
    def merge(self) -> None:
        self.check_mergeable()
        self.base.weight.copy_(self.folded_weight(+1))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta again. W + d - d equals W only up to rounding (about 1e-7 of |W + d| in fp32)."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        self.base.weight.copy_(self.folded_weight(-1))
        self.merged = False


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def check_lora_targets(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8) -> None:
    """Raise ValueError, naming what is wrong, unless apply_lora_to_model(model, targets, r) can adapt
    the model: every target names a linear layer, none shares its weight, r fits each of them."""
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    unknown = sorted(set(targets) - set(linear_names))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or '(none given)'}; the model's linear layers are "
                         f"{linear_names}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; load a fresh base model")
    # A weight shared by two modules (lm_head tied to the embedding) would take the delta into both when merged.
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            if len(names[id(m.weight)]) > 1:
                others = [n for n in names[id(m.weight)] if n != f"{name}.weight"]
                raise ValueError(f"LoRA target {name!r} shares its weight with {', '.join(others)} (tied "
                                 "embeddings): merging would add the delta to both; leave it out of the targets")
            if not 1 <= r <= min(m.in_features, m.out_features):
                raise ValueError(f"LoRA rank r must be in [1, {min(m.in_features, m.out_features)}] for "
                                 f"{name} ({m.in_features}->{m.out_features}), got {r}")


def apply_lora_to_model(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16.0,
                        dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Freeze every parameter, then swap each nn.Linear whose name ends in one of `targets` for a
    LoRALinear holding it. Returns the model (changed in place). Refuses (check_lora_targets) before
    changing anything."""
    check_lora_targets(model, targets, r)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, use_rslora))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight. All merged weights are computed and checked first, so a
    refusal (already merged, switched off, NaN or Inf anywhere) leaves every layer as it was."""
    _merge_all(list(lora_layers(model).values()))


@torch.no_grad()
def _merge_all(layers: list[LoRALinear]) -> None:
    for layer in layers:
        layer.check_mergeable()
    merged = [layer.folded_weight(+1) for layer in layers]
    for layer, weight in zip(layers, merged):
        layer.base.weight.copy_(weight)
        layer.merged = True


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the adapter path off (the base model's function) or on, without touching weights."""
    for layer in lora_layers(model).values():
        if layer.merged:
            raise RuntimeError("unmerge the adapter before disabling it")
        layer.enabled = enabled


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (those merged already stay as they are) and put the plain
    nn.Linear back: a standard model. As in merge_lora, a refusal leaves every layer as it was."""
    layers = lora_layers(model)
    _merge_all([layer for layer in layers.values() if not layer.merged])
    for name, layer in layers.items():
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], layer.base)
    return model


def parameter_report(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


# ---- adapter files -----------------------------------------------------------------------------


def base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the base weights under their plain names: equal to the fingerprint of the same
    model without LoRA layers. Refused while merged (the base weights then hold the delta)."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError("unmerge the adapter before fingerprinting the base model")
    base = {k.replace(".base.", "."): v for k, v in unique_tensors(model).items() if ".lora_" not in k}
    return fingerprint(base)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{ab}.weight": getattr(layer, ab).weight.detach().cpu().contiguous()
            for name, layer in lora_layers(model).items() for ab in ("lora_A", "lora_B")}


def save_adapter(model: nn.Module, folder: str | Path) -> dict:
    """adapter_config.json + adapter_model.safetensors (A and B only). Returns the config."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    base = base_fingerprint(model)  # refuses a merged model before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model)
    save_tensors(folder / "adapter_model.safetensors", tensors)
    # Each file is replaced atomically, but not the two together: the config, written last, names the
    # weights by their hash, so a crash between the two writes leaves a pair that load_adapter refuses.
    config = {"format": "microlm-lora", "r": first.r, "alpha": first.alpha, "use_rslora": first.use_rslora,
              "dropout": getattr(first.dropout, "p", 0.0), "targets": sorted({n.rsplit(".", 1)[-1] for n in layers}),
              "base_fingerprint": base, "n_params": sum(t.numel() for t in tensors.values()),
              "weights_sha256": sha256_file(folder / "adapter_model.safetensors")}
    save_json(folder / "adapter_config.json", config)
    return config


ADAPTER_KEYS = ("format", "r", "alpha", "use_rslora", "dropout", "targets", "base_fingerprint", "n_params",
                "weights_sha256")


def read_adapter_config(folder: str | Path) -> dict:
    """adapter_config.json, checked: every key present and none unknown, values of the right kind."""
    path = Path(folder) / "adapter_config.json"
    config = load_json(path, "adapter config")
    if config.get("format") != "microlm-lora":
        raise CheckpointError(f"{path}: not a microlm LoRA adapter (format {config.get('format')!r}, expected "
                              "'microlm-lora'); `microlm lora-finetune` writes one")
    check_keys(config, path, ADAPTER_KEYS)
    r, targets = config["r"], config["targets"]
    alpha, dropout, rslora = config["alpha"], config["dropout"], config["use_rslora"]
    if not (type(r) is int and r >= 1 and isinstance(targets, list) and targets
            and all(isinstance(t, str) for t in targets) and type(alpha) in (int, float) and 0 < alpha < math.inf
            and type(dropout) in (int, float) and 0 <= dropout < 1 and type(rslora) is bool):
        raise CheckpointError(f"{path}: r must be an integer >= 1, targets a non-empty list of layer names, alpha a "
                              "finite number > 0, dropout a number in [0, 1) and use_rslora true or false; got "
                              f"r={r!r}, targets={targets!r}, alpha={alpha!r}, dropout={dropout!r}, use_rslora={rslora!r}")
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> dict:
    """Load A and B into a model that already has matching LoRA layers (apply_lora_to_model with the
    adapter's r and targets). Refuses, with the reason, an adapter for another base, rank or target set."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    layers = lora_layers(model)
    if not layers:
        raise CheckpointError(f"{folder}: the model has no LoRA layers; call apply_lora_to_model with "
                              f"r={config.get('r')} and targets={config.get('targets')} first")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("unmerge the current adapter before loading another")
    first = next(iter(layers.values()))
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    for key, mine in (("r", first.r), ("targets", targets), ("alpha", first.alpha), ("use_rslora", first.use_rslora)):
        if config.get(key) != mine:
            raise CheckpointError(f"{folder}: adapter has {key}={config.get(key)!r} but the model's LoRA layers "
                                  f"have {key}={mine!r}")
    if config.get("base_fingerprint") != base_fingerprint(model):
        raise CheckpointError(f"{folder}: this adapter was trained on another base model (fingerprint "
                              f"{config.get('base_fingerprint')} != {base_fingerprint(model)}); load it onto the "
                              "model folder it was trained on")
    weights = folder / "adapter_model.safetensors"
    tensors = read_tensors(weights, "adapter")
    if sha256_file(weights) != config["weights_sha256"]:
        raise CheckpointError(f"{weights}: these weights are not the ones {folder / 'adapter_config.json'} was "
                              "written for (a save was cut off between the two files, or one was copied over); "
                              "save the adapter again, or copy both files from the same run")
    expected = adapter_tensors(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: adapter keys do not match: missing {missing[:4]}, unexpected {unexpected[:4]}; "
                              "adapter_model.safetensors and adapter_config.json are from different runs")
    with torch.no_grad():
        for name, layer in layers.items():
            for ab in ("lora_A", "lora_B"):
                t = tensors[f"{name}.{ab}.weight"]
                if t.shape != getattr(layer, ab).weight.shape:
                    raise CheckpointError(f"{folder}: {name}.{ab} has shape {tuple(t.shape)}, expected "
                                          f"{tuple(getattr(layer, ab).weight.shape)}")
                getattr(layer, ab).weight.copy_(t)
    return config
