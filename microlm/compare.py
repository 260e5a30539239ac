"""What LoRA costs and what it buys: one process measures a trained adapter against its base and
against full fine-tuning, side by side, and writes `compare.json`, four plots and a table.

  * accuracy: exact match on the held-out questions for the base, LoRA unmerged, LoRA merged,
    merge_and_unload and the full fine-tune;
  * sameness: merged vs unmerged logits over every held-out token, in fp32 and again in float64 (where
    rounding shrinks by ~1e9, so a real difference would stand out), and whether greedy answers agree;
  * cost: per-token latency of base, merged (unloaded and in place) and unmerged; step time and training
    memory of LoRA vs full; adapter file vs model file (both fp32 safetensors, weights only);
  * the rank sweep: the same budget at other ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import load_json, save_json
from .evaluate import (format_ratio, logits_of, max_abs_diff, paired_ratio, per_token_latency,
                       timing_stats)
from .finetune import (accuracy, build_sft_data, fitting, fixed_batches, load_lora_run, lora_config_from_dict,
                       packing_context, prepare_model, read_sft_jsonl, run_finetune, sft_batch, split_user_examples,
                       training_memory)
from .lora import check_lora_targets, lora_layers, merge_and_unload, merge_lora
from .runs import load_run, sha256_file
from .train import TrainConfig, make_optimizer, masked_loss
from .world import World

RANKS = (1, 2, 4, 8, 16, 32)
# "all linear" as in PEFT: every linear of the blocks, not lm_head (tied to the embedding here: apply_lora_to_model
# refuses it, since merging would change the embedding too).
TARGET_SETS = {"q, v": ("q_proj", "v_proj"), "q, k, v, output": ("q_proj", "k_proj", "v_proj", "output_proj"),
               "all linear": ("q_proj", "k_proj", "v_proj", "output_proj", "gate_proj", "up_proj", "down_proj")}
# Larger models, for scale: (name, d_model, n_layers, total parameters). LoRA on q, k, v, output adds
# r * (d + d) per matrix, 4 matrices per layer.
REFERENCE_SHAPES = (("GPT-2 small", 768, 12, 124_439_808), ("LLaMA-7B", 4096, 32, 6_738_415_616))


def run_examples(run_config: dict, base_config: dict, run_dir: Path, scratch: Path) -> tuple[list, list, dict]:
    """(training examples, held-out examples, the files that hold them) of a fine-tuning run, split as the run
    split them (finetune.load_examples). The files must be the ones the run read (their hashes are in its
    config): a later fine-tune with other --n-train, --n-val or --seed rewrites data/sft_*.jsonl, and from
    another working folder they are not there at all. The built-in question set is a function of the story
    world, sizes and seed, so it is then rebuilt into `scratch` and checked against the same hashes."""
    sft, seed = run_config["sft"], run_config["train"]["seed"]
    files = {split: sft[split] for split in ("train", "val") if sft.get(split)}
    stale = [path for split, path in files.items() if sft.get(f"{split}_sha256") not in (None, _sha(path))]
    if stale and sft.get("kind") == "stories":
        world = World.from_dict(base_config["data"]["world"], f"the base model {run_config['base']}")
        rebuilt = build_sft_data(scratch, world, sft["sizes"], seed)
        if [_sha(rebuilt[split]) for split in files] == [sft[f"{split}_sha256"] for split in files]:
            print(f"note: {' and '.join(stale)}: missing here or changed since {run_dir} was trained (a fine-tune "
                  "with other sizes rewrites them); its question set was rebuilt from the world, sizes and seed")
            files = {split: str(rebuilt[split]) for split in files}
            stale = []
    if stale:
        why = "is missing" if _sha(stale[0]) is None else "is not the file the run read (its sha256 differs)"
        raise ValueError(f"{stale[0]} {why}; {run_dir} was trained and evaluated on it: put that file back (the path "
                         "is read from the folder the run was trained in), or fine-tune again")
    if "val" in files:
        return read_sft_jsonl(files["train"]), read_sft_jsonl(files["val"]), files
    return (*split_user_examples(read_sft_jsonl(files["train"]), seed), files)


def _sha(path) -> str | None:
    return sha256_file(path) if Path(path).is_file() else None


def differing_answers(model, tokenizer, examples, answers_a, answers_b) -> list[dict]:
    """Examples where two models' greedy answers differ, with the margin between the top two logits
    at the answer's first token (a small margin means rounding can tip the choice)."""
    out = []
    for ex, a, b in zip(examples, answers_a, answers_b):
        if a != b:
            ids = torch.tensor([[tokenizer.eot_id] + tokenizer.encode_ordinary(ex["prompt"])])
            with torch.no_grad():
                top2 = model(ids)[0, -1].topk(2).values
            out.append({"prompt_end": ex["prompt"][-60:], "unmerged": a, "merged": b,
                        "top2_margin": (top2[0] - top2[1]).item()})
    return out


def count_trainable(base: torch.nn.Module, targets, r: int) -> int:
    """Parameters LoRA would train: r * (d_in + d_out) for every targeted nn.Linear."""
    return sum(r * (m.in_features + m.out_features) for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def training_step(model, opt, x, y) -> None:
    """One optimizer step on (x, y): forward, loss, backward, AdamW step (training's loop adds
    clipping and logging around it)."""
    model.train()
    masked_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_cost(models: dict, batch, cfg: TrainConfig, repeats: int = 9) -> dict:
    """Seconds per optimizer step of each model on the same batch, the models taking turns after two
    warm-up rounds, each round starting with the next model (so that no model always follows the
    same one): timing_stats per model (median, min, max and the rounds' timings)."""
    opts = {name: make_optimizer(m, cfg) for name, m in models.items()}
    times = {name: [] for name in models}
    names = list(models)
    x, y = batch
    for i in range(repeats + 2):
        for name in names[i % len(names):] + names[: i % len(names)]:
            m = models[name]
            t = time.perf_counter()
            training_step(m, opts[name], x, y)
            if i >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - t)
    return {name: timing_stats(ts) for name, ts in times.items()}


def run_compare(lora_dir, full_dir=None, out_dir=None, sweep_ranks=(), latency_tokens: int = 64,
                repeats: int = 21, progress: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="microlm-compare-") as scratch:  # for a rebuilt question set
        return _compare(lora_dir, full_dir, out_dir, sweep_ranks, latency_tokens, repeats, progress, Path(scratch))


def _compare(lora_dir, full_dir, out_dir, sweep_ranks, latency_tokens, repeats, progress, scratch: Path) -> dict:
    from .plots import plot_finetune_loss, plot_latency, plot_param_counts, plot_rank_sweep
    from .train import read_metrics
    lora_dir = Path(lora_dir)
    out_dir = Path(out_dir or lora_dir)
    run_config = load_json(lora_dir / "config.json", "LoRA run config")
    if run_config.get("kind") != "lora":
        raise ValueError(f"{lora_dir} is not a LoRA run (no adapter); pass the folder `microlm lora-finetune` wrote")
    lora_cfg = lora_config_from_dict(run_config["lora"])
    model, tokenizer, base_config, run_config = load_lora_run(lora_dir)  # its "base" found from here
    base, _, _ = load_run(run_config["base"])
    for r in sorted(set(sweep_ranks)):  # checked now, not after minutes of measuring
        try:
            check_lora_targets(base, lora_cfg.targets, r)
        except ValueError as e:
            raise ValueError(f"--sweep-ranks: {e}") from None
    train_examples, heldout, sft_files = run_examples(run_config, base_config, lora_dir, scratch)
    examples, encoded, _ = fitting(tokenizer, heldout, model.config.context_length)
    batches = [(x, n) for x, _, n in fixed_batches(encoded, tokenizer.eot_id)]
    res: dict = {"n_heldout": len(examples), "lora": dataclasses.asdict(lora_cfg)}
    print(f"compare {len(examples)} held-out questions; LoRA r={lora_cfg.r} on {', '.join(lora_cfg.targets)}")

    # 1. Accuracy of every variant, and merged vs unmerged.
    acc = {}
    acc["base"], _ = accuracy(base, tokenizer, examples)
    acc["lora_unmerged"], ans_unmerged = accuracy(model, tokenizer, examples)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    acc["lora_merged"], ans_merged = accuracy(merged, tokenizer, examples)
    unloaded = merge_and_unload(copy.deepcopy(model))
    assert not lora_layers(unloaded)
    acc["merge_and_unload"], _ = accuracy(unloaded, tokenizer, examples)
    if full_dir:
        full, _, _ = load_run(full_dir)
        acc["full_finetune"], _ = accuracy(full, tokenizer, examples)
    res["accuracy"] = acc
    logits_u, logits_m = logits_of(model, batches), logits_of(merged, batches)
    res["max_abs_logit_diff_fp32"] = max_abs_diff(logits_u, logits_m)
    res["max_abs_logit_fp32"] = max(t.abs().max().item() for t in logits_u)
    model64 = copy.deepcopy(model).double()
    merged64 = copy.deepcopy(model64)
    merge_lora(merged64)
    logits_64 = logits_of(model64, batches)
    res["max_abs_logit_diff_fp64"] = max_abs_diff(logits_64, logits_of(merged64, batches))
    # How far each fp32 model is from the exact function (float64): the rounding that the fp32
    # difference above is made of. Two roundings of one function differ by about as much.
    res["fp32_error_vs_fp64"] = {"unmerged": max_abs_diff(logits_u, logits_64), "merged": max_abs_diff(logits_m, logits_64)}
    res["greedy_identical"] = sum(a == b for a, b in zip(ans_unmerged, ans_merged)) / len(examples)
    res["greedy_differing"] = differing_answers(model, tokenizer, examples, ans_unmerged, ans_merged)
    del model64, merged64

    # 2. Cost: latency, files, training step and memory.
    prompt = torch.tensor([[tokenizer.eot_id] + tokenizer.encode_ordinary(examples[0]["prompt"])])
    n_new = min(latency_tokens, model.config.context_length - prompt.shape[1])
    # "merged" is the model as it is deployed: merge_and_unload, plain Linear layers. Merged in place, the
    # LoRALinear wrappers stay and each call still costs a Python branch: at 2 ms a token that shows.
    res["latency_per_token"] = per_token_latency({"base": base, "merged": unloaded, "merged_in_place": merged,
                                                  "unmerged": model}, prompt, n_new, repeats)
    res["latency_tokens"] = n_new
    adapter_bytes = (lora_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    model_bytes = (Path(run_config["base"]) / "model.safetensors").stat().st_size
    res["files"] = {"adapter_bytes": adapter_bytes, "model_bytes": model_bytes, "ratio": adapter_bytes / model_bytes,
                    "dtype": "float32"}
    cfg = TrainConfig(**run_config["train"])
    _, train_enc, _ = fitting(tokenizer, train_examples, model.config.context_length)
    batch = sft_batch(train_enc, cfg.batch_size, tokenizer.eot_id, cfg.seed, 0,
                      packing_context(base, tokenizer.eot_id))  # as training draws its first batch
    trainers = {"lora": prepare_model(copy.deepcopy(base), lora_cfg), "full": prepare_model(copy.deepcopy(base), None)}
    res["train_step"] = step_cost(trainers, batch, cfg)
    res["train_memory_bytes"] = {name: training_memory(m, batch, cfg) for name, m in trainers.items()}
    res["trainable_params"] = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                               for name, m in trainers.items()}
    res["total_params"] = sum(p.numel() for p in base.parameters())
    del trainers

    # 3. Parameter counts over ranks and target sets, and at larger shapes (formula).
    rows = [{"targets": name, "r": r, "trainable": count_trainable(base, t, r), "total": res["total_params"]}
            for name, t in TARGET_SETS.items() for r in RANKS if r <= model.config.d_model]
    shapes = [{"name": "microlm", "trainable": count_trainable(base, lora_cfg.targets, 8), "total": res["total_params"]}]
    shapes += [{"name": n, "trainable": layers * 4 * 8 * (d + d), "total": total} for n, d, layers, total in REFERENCE_SHAPES]
    res["param_counts"], res["reference_shapes"] = rows, shapes

    # 4. Rank sweep: the same budget at other ranks (the run's own rank is reused).
    sweep = []
    for r in sorted(set(sweep_ranks)):
        if r == lora_cfg.r:
            a = acc["lora_unmerged"]
        else:
            print(f"sweep   LoRA r={r}")
            s = run_finetune(run_config["base"], out_dir / "sweep" / f"r{r}", dataclasses.replace(lora_cfg, r=r), cfg,
                             sft_data=sft_files["train"], sft_val=sft_files.get("val"),
                             overwrite=True, progress=progress)
            a = s["accuracy"]
        sweep.append({"r": r, "accuracy": a, "trainable": count_trainable(base, lora_cfg.targets, r)})
    res["rank_sweep"] = sweep

    # 5. Files.
    plot_param_counts(rows, shapes, out_dir / "param_counts.png")
    curves = {f"LoRA r={lora_cfg.r}": read_metrics(lora_dir / "metrics.jsonl")}
    if full_dir:
        curves["full fine-tune"] = read_metrics(Path(full_dir) / "metrics.jsonl")
    plot_finetune_loss(curves, out_dir / "finetune_loss.png")
    if sweep:
        plot_rank_sweep(sweep, acc.get("full_finetune"), out_dir / "rank_sweep.png")
    elif (out_dir / "rank_sweep.png").exists():  # an earlier compare's, whose figures this compare.json lacks
        (out_dir / "rank_sweep.png").unlink()
        kept = f" (its runs stay in {out_dir / 'sweep'})" if (out_dir / "sweep").is_dir() else ""
        print(f"note: no rank sweep this time: removed the earlier {out_dir / 'rank_sweep.png'}{kept}")
    plot_latency(res["latency_per_token"], out_dir / "latency.png")
    save_json(out_dir / "compare.json", res)
    return res


ROUNDS = " across rounds"  # how the table's ratios say what their range is


def compare_table(res: dict) -> str:
    """compare.json as a markdown table, with each target of the LoRA stage marked met or not."""
    acc = res["accuracy"]
    lat = {k: v["median_s"] for k, v in res["latency_per_token"].items()}
    step = {k: v["median_s"] for k, v in res["train_step"].items()}
    vs_base = {k: paired_ratio(v, res["latency_per_token"]["base"]) for k, v in res["latency_per_token"].items()}
    shown = {k: format_ratio(r, ".3f", note=ROUNDS) for k, r in vs_base.items()}
    step_ratio = paired_ratio(res["train_step"]["lora"], res["train_step"]["full"])
    mem = {k: v["total"] for k, v in res["train_memory_bytes"].items()}
    full = acc.get("full_finetune")
    mark = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    rows = [(f"exact match, {res['n_heldout']} held-out questions", "")]
    names = {"base": "pretrained base (no adapter)", "lora_unmerged": "LoRA, unmerged", "lora_merged": "LoRA, merged",
             "merge_and_unload": "merge_and_unload (plain model)", "full_finetune": "full fine-tune"}
    for k, v in acc.items():
        rows.append((f"  {names[k]}", f"{v:.1%}"))
    if full:
        rows.append(("LoRA / full fine-tune", f"{acc['lora_unmerged'] / full:.3f} (target >= 0.95: "
                                              f"{mark(acc['lora_unmerged'] >= 0.95 * full)})"))
    rows += [
        ("trainable parameters", f"LoRA {res['trainable_params']['lora']:,} of {res['total_params']:,} "
                                 f"({res['trainable_params']['lora'] / res['total_params']:.2%}); full: all"),
        ("max abs logit diff, merged vs unmerged, fp32", f"{res['max_abs_logit_diff_fp32']:.2e} (logits up to "
         f"{res['max_abs_logit_fp32']:.1f}; target <= 1e-4: {mark(res['max_abs_logit_diff_fp32'] <= 1e-4)})"),
        ("same, float64", f"{res['max_abs_logit_diff_fp64']:.2e} (target <= 1e-9: "
                          f"{mark(res['max_abs_logit_diff_fp64'] <= 1e-9)})"),
    ]
    if "fp32_error_vs_fp64" in res:  # compare.json files written before this figure existed lack it
        err = res["fp32_error_vs_fp64"]
        rows.append(("fp32 rounding: max abs logit error vs float64, unmerged / merged",
                     f"{err['unmerged']:.2e} / {err['merged']:.2e}"))
    rows += [
        ("greedy answers identical", f"{res['greedy_identical']:.1%}" + "".join(
            f"; differs: {d['unmerged']!r} vs {d['merged']!r} (top-2 margin {d['top2_margin']:.2g})"
            for d in res["greedy_differing"][:3])),
        ("latency per token (medians), base", f"{1e3 * lat['base']:.2f} ms"),
        ("  merged (merge_and_unload)", f"{1e3 * lat['merged']:.2f} ms: {shown['merged']} base (target <= 1.03: "
                                        f"{mark(vs_base['merged']['median'] <= 1.03)})"),
        ("  merged in place", f"{1e3 * lat['merged_in_place']:.2f} ms: {shown['merged_in_place']} base"),
        ("  unmerged", f"{1e3 * lat['unmerged']:.2f} ms: {shown['unmerged']} base"),
        ("adapter file vs model file (fp32)", f"{res['files']['adapter_bytes'] / 1024:.1f} KiB vs "
         f"{res['files']['model_bytes'] / 1024:.1f} KiB ({res['files']['ratio']:.2%})"),
        ("training step, LoRA vs full", f"{1e3 * step['lora']:.1f} vs {1e3 * step['full']:.1f} ms (medians); "
                                        f"{format_ratio(step_ratio, note=ROUNDS)}"),
        ("training memory (tensors), LoRA vs full", f"{mem['lora'] / 2**20:.1f} vs {mem['full'] / 2**20:.1f} MiB "
                                                    f"({mem['lora'] / mem['full']:.2f}x)"),
    ]
    if res.get("rank_sweep"):
        rows.append(("rank sweep (r: exact match)", ", ".join(f"{p['r']}: {p['accuracy']:.1%}" for p in res["rank_sweep"])))
    return "| LoRA stage | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
