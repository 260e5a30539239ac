"""LoRA: what an adapter costs to train and what merging removes at inference.

Training: one step of LoRA r=8 on q, k, v and output_proj (microlm's defaults) against one step of full
fine-tuning, same model, batch and optimizer (microlm.compare.step_cost, taking turns), and the
tensor memory of each step at its peak (microlm.finetune.training_memory: weights, saved activations,
gradients, AdamW moments). LoRA skips the weight gradients of the frozen matrices and their AdamW
state, but the backward pass still carries gradients through every layer to reach the adapters. A
third contender measures that floor (lora_floor): the same model with every weight frozen but the
first block's query and key norm gains, so its backward runs through every layer as LoRA's must,
with no adapter and no weight gradient of a matrix to compute. No LoRA step can be much cheaper.

Memory is also measured: torch.profiler records every allocation and free of CPU tensor memory,
with the running total, during one step after a warm-up one (measured_step_memory). That is the
step's real peak, temporaries included, where the count above is an estimate.

Inference: seconds per generated token (batch 1, KV cache; microlm.evaluate.per_token_latency, every
model decoding the same tokens, sampled from the base as bench_generation samples) of the base, the
adapter merged and unloaded (plain nn.Linear again: what is deployed), merged in place (LoRALinear
wrappers kept) and unmerged (two extra small matmuls per adapted layer).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_generation import DECODING, first_end_token_step, sampling
from bench_training import random_batch
from microlm.compare import step_cost, training_step
from microlm.evaluate import per_token_latency
from microlm.finetune import LoRAConfig, finetune_defaults, prepare_model, training_memory
from microlm.generate import generate
from microlm.lora import lora_layers, merge_and_unload, merge_lora
from microlm.model import GPT, GPTConfig
from microlm.train import make_optimizer
from timing import paired_ratio, target


def bench_lora(config: GPTConfig, batch_size: int, repeats: int, latency_tokens: int) -> dict:
    torch.manual_seed(0)
    base = GPT(config)
    lora_cfg = LoRAConfig()
    train_cfg = dataclasses.replace(finetune_defaults(full=False), batch_size=batch_size)
    batch = random_batch(config.vocab_size, batch_size, config.context_length)

    print(f"  lora  training step, r={lora_cfg.r} on {', '.join(lora_cfg.targets)} vs full", flush=True)
    trainers = {"lora": prepare_model(copy.deepcopy(base), lora_cfg), "full": prepare_model(copy.deepcopy(base), None),
                "frozen": lora_floor(base)}
    step = step_cost(trainers, batch, train_cfg, repeats)
    memory = {name: training_memory(trainers[name], batch, train_cfg) for name in ("lora", "full")}
    measured = {name: measured_step_memory(trainers[name], batch, train_cfg) for name in ("lora", "full")}
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in trainers.items()}
    del trainers

    print("  lora  per-token latency: base, merged, merged in place, unmerged", flush=True)
    adapted = prepare_model(copy.deepcopy(base), lora_cfg).eval()
    with torch.no_grad():  # a trained adapter is not zero: give B values, so merging really changes W
        for layer in lora_layers(adapted).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    merged_in_place = copy.deepcopy(adapted)
    merge_lora(merged_in_place)
    merged = merge_and_unload(copy.deepcopy(adapted))
    prompt = torch.tensor([[max(config.eot_id, 0)]])
    n_tokens = min(latency_tokens, config.context_length - 1)
    # Three times the repeats: a repeat is a fraction of a second, and with seven the medians of two
    # identical models came out up to 3% apart on this noisy 2-core machine.
    tokens = generate(base.eval(), prompt, n_tokens, **sampling())[0]  # story-like tokens (bench_generation)
    latency = per_token_latency({"base": base, "merged": merged, "merged_in_place": merged_in_place,
                                 "unmerged": adapted}, prompt, repeats=3 * repeats, tokens=tokens)

    vs_base = {k: paired_ratio(v, latency["base"]) for k, v in latency.items() if k != "base"}
    step_ratio = paired_ratio(step["lora"], step["full"])
    memory_ratio = memory["lora"]["total"] / memory["full"]["total"]
    peak_ratio = measured["lora"]["peak"] / measured["full"]["peak"]
    return {
        "lora": dataclasses.asdict(lora_cfg), "batch": list(batch[0].shape), "trainable_params": trainable,
        "train_step": step, "step_ratio_lora_full": step_ratio,
        "step_ratio_frozen_full": paired_ratio(step["frozen"], step["full"]),
        "step_ratio_lora_frozen": paired_ratio(step["lora"], step["frozen"]),
        "train_memory_bytes": memory, "memory_ratio_lora_full": memory_ratio,
        "train_memory_measured_bytes": measured, "peak_memory_ratio_lora_full": peak_ratio,
        "latency_tokens": len(tokens), "latency_decoding": DECODING,
        "latency_first_end_token_step": first_end_token_step([tokens], config.eot_id),
        "latency_per_token": latency,
        "latency_ratio_to_base": vs_base,
        "targets": {"lora_step_vs_full": target(step_ratio["median"], "<=", 0.8),
                    "lora_memory_vs_full": target(peak_ratio, "<", 1.0),
                    "merged_latency_vs_base": target(vs_base["merged"]["median"], "<=", 1.03)},
    }


def lora_floor(base: GPT) -> GPT:
    """A copy of base whose only trainable weights are the first block's query and key norm gains
    (QK-norm; without it, the first block's attention-norm gain). The gradient must still flow back
    through every layer to reach them, as it must to reach LoRA's adapters on q, k, v and output_proj
    of the first block, but no weight gradient of a matrix is computed, and AdamW updates two small
    vectors. (The attention-norm gain would also send the gradient back through the first block's
    frozen q, k and v projections, which LoRA never needs: their input is the frozen embedding.)"""
    model = copy.deepcopy(base).train()
    attn = model.blocks[0].attn
    trainable = ([attn.q_norm.weight, attn.k_norm.weight] if model.config.qk_norm
                 else [model.blocks[0].attn_norm.weight])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    return model


def measured_step_memory(model: torch.nn.Module, batch, cfg) -> dict:
    """Bytes of CPU tensor memory of one training step of a copy of `model`, as the allocator saw it.
    'resident': what exists between steps (weights and buffers, AdamW's moments, the batch), counted
    after a warm-up step; 'step_peak': the most the next step had allocated at once on top of that
    (saved activations, gradients, temporaries), the running total torch.profiler records with each
    allocation and free; 'peak': their sum. The step frees what it allocated (its gradients too), so
    nothing allocated before it is freed while the profiler watches (whose frees it could not size)."""
    model = copy.deepcopy(model)
    opt = make_optimizer(model, cfg)
    x, y = batch
    training_step(model, opt, x, y)  # AdamW makes its moments in its first step
    tensors = [*model.parameters(), *model.buffers(), x, y,
               *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # tied: once
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        training_step(model, opt, x, y)
    with tempfile.TemporaryDirectory() as tmp:  # the allocation records are read from the exported trace
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    records = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                     if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)  # 0: CPU
    if not records:
        raise RuntimeError("torch.profiler recorded no CPU allocation during a training step")
    # The running total is the process's since memory profiling first ran; what it stood at before the step's
    # first allocation (e.g. memory an earlier profiled block allocated and freed later) is not the step's.
    before = records[0][1] - records[0][2]
    out = {"resident": sum(resident.values()), "step_peak": max(total for _, total, _ in records) - before}
    out["peak"] = out["resident"] + out["step_peak"]
    return out
