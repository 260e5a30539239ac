"""Fine-tuning a pretrained model on the question set: LoRA (only A and B train) or all weights.

Both kinds use the pretraining loop (train.py) with the same data, batch and number of steps, so the
comparison is fair. Batches come from `sft_batch(step)`, a pure function of (seed, step), which keeps
resume exact. What fine-tuning writes:

    runs/lora/  config.json (base folder, LoRA and training settings), adapter/ (adapter_config.json +
                adapter_model.safetensors), metrics.jsonl, checkpoint/, answers.jsonl, summary.json, loss.png
    runs/full/  a model folder (runs.py) plus metrics.jsonl, checkpoint/, answers.jsonl, summary.json,
                loss.png: a later fine-tune can start from it
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, changed_settings, load_json, replace_dir, save_json, save_text
from .data import IGNORE
from .evaluate import exact_match, greedy_answers
from .lora import DEFAULT_TARGETS, apply_lora_to_model, check_lora_targets
from .sft import collate, encode_examples, make_sft_set, question_fingerprint, read_sft_jsonl
from .train import TrainConfig, masked_loss
from .world import World

# Question-set sizes for `make lora-finetune` (data/README.md says why).
SFT_SPLITS = {"train": 24_000, "val": 500}


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0  # scaling = alpha / r = 2 at r = 8
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)


def finetune_defaults(full: bool) -> TrainConfig:
    """The fine-tuning budget: the same steps and batch for LoRA and full fine-tuning. Each gets the
    learning rate that suits it: the adapter starts at zero and needs a larger step than weights that
    are already trained (LoRA at 5e-3 learned `who_has` on only some seeds, at 2e-2 it reached 64% on
    the one seed tried; 7e-3 is the README's choice). 1,000 steps of 16 draw 16,000 questions from
    24,000, so about one in seven comes twice or more: in the sixteen-name world, with 400 steps on
    8,000 questions full fine-tuning reached 81% and LoRA 72%, with 1,000 on 8,000 86% and 84%, full
    fine-tuning's training loss far below its held-out loss (see the README)."""
    return TrainConfig(max_steps=1000, batch_size=16, lr=1e-3 if full else 7e-3, warmup_steps=30, weight_decay=0.0,
                       eval_every=200, checkpoint_every=200)


# ---- the question set on disk ------------------------------------------------------------------


def build_sft_data(data_dir: str | Path, world: World, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    """Write sft_train.jsonl and sft_val.jsonl (and sft_stats.json) under data_dir, unless files made
    with the same world, sizes and seed are there already. Returns the two paths."""
    data_dir = Path(data_dir)
    paths = {split: data_dir / f"sft_{split}.jsonl" for split in sizes}
    recipe = json.loads(json.dumps({"world": world.to_dict(), "questions": question_fingerprint(), "sizes": sizes,
                                    "seed": seed}))
    stats_path = data_dir / "sft_stats.json"
    if stats_path.is_file() and all(p.is_file() for p in paths.values()):
        if load_json(stats_path, "question-set stats").get("recipe") == recipe:
            return paths
    sets = make_sft_set(world, sizes, seed)
    for split, examples in sets.items():
        save_text(paths[split], "".join(json.dumps(ex) + "\n" for ex in examples))
    kinds = {split: {k: sum(ex["kind"] == k for ex in exs) for k in sorted({ex["kind"] for ex in exs})}
             for split, exs in sets.items()}
    save_json(stats_path, {"recipe": recipe, "kinds": kinds})  # last: its presence means the rest is complete
    return paths


def split_user_examples(examples: list[dict], seed: int, val_fraction: float = 0.1) -> tuple[list, list]:
    """A held-out split for a user's own file given without --sft-val: a seeded 10% of its lines."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(examples) * val_fraction))
    if len(examples) < 2:
        raise ValueError("the fine-tuning file needs at least 2 examples (one to train on, one to validate)")
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


# ---- batches -----------------------------------------------------------------------------------


def sft_batch(encoded: list, batch_size: int, pad_id: int, seed: int, step: int, context: int | None = None):
    """(inputs, targets) of `batch_size` examples drawn for training step `step` from (seed, step) alone,
    packed into rows of `context` inputs when given (sft.collate; the model must mask documents)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randint(0, len(encoded), (batch_size,), generator=g).tolist()
    b = collate([encoded[i] for i in rows], pad_id, context)
    return b.inputs, b.targets


def packing_context(model, eot_id: int) -> int | None:
    """Rows of context_length for packed fine-tuning batches, or None (one example per row) unless the
    model starts a document at `eot_id`, the token that separates packed examples: without that mask
    they would see each other (a `--corpus` base, for one, is trained without it)."""
    return model.config.context_length if model.config.eot_id == eot_id >= 0 else None


def fixed_batches(encoded: list, pad_id: int, batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    """Every example once, in order: (inputs, targets, real lengths) for evaluation."""
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i: i + batch_size]
        b = collate(chunk, pad_id)
        out.append((b.inputs, b.targets, [len(ids) - 1 for ids, _ in chunk]))
    return out


@torch.no_grad()
def answer_loss(model, batches) -> dict:
    """Mean cross-entropy on the answer tokens (and the end token) of the held-out questions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for x, y, _ in batches:
        logits = model(x.to(device))
        y = y.to(device)
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                                 reduction="sum").item()
        n += (y != IGNORE).sum().item()
    model.train(was_training)
    return {"val_loss": nll / n}


def accuracy(model, tokenizer, examples: list[dict]) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy answers on `examples`, and the answers."""
    answers = greedy_answers(model, tokenizer, [ex["prompt"] for ex in examples])
    return exact_match(answers, examples), answers


def accuracy_by_kind(answers: list[str], examples: list[dict]) -> dict[str, float]:
    kinds = sorted({ex.get("kind", "all") for ex in examples})
    out = {}
    for k in kinds:
        pairs = [(a, ex) for a, ex in zip(answers, examples) if ex.get("kind", "all") == k]
        out[k] = exact_match([a for a, _ in pairs], [ex for _, ex in pairs])
    return out


# ---- the model to train ------------------------------------------------------------------------


def prepare_model(model: torch.nn.Module, lora: LoRAConfig | None) -> torch.nn.Module:
    """LoRA: freeze the model and add adapters on lora.targets. Full (lora None): train every weight."""
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return apply_lora_to_model(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.use_rslora)


def lora_config_from_dict(d: dict) -> LoRAConfig:
    names = {f.name for f in dataclasses.fields(LoRAConfig)}
    return LoRAConfig(**{k: tuple(v) if k == "targets" else v for k, v in d.items() if k in names})


def training_memory(model: torch.nn.Module, batch, cfg: TrainConfig) -> dict:
    """Bytes of the tensors one training step needs: weights, activations saved for the backward pass,
    gradients and AdamW's two moments, counted tensor by tensor, each storage once, and added up. An
    estimate of the step's peak, not the peak itself: the backward pass frees saved activations as it
    makes the gradients, so not all of both exist at once, and temporaries (the gradients of the
    activations, AdamW's scratch) are not counted. Not the process's RSS, which is dominated by the
    Python and PyTorch runtime at this model size."""
    from .train import make_optimizer
    model, (x, y) = copy.deepcopy(model), batch  # the step below must not change the caller's model
    opt = make_optimizer(model, cfg)
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = masked_loss(model(x), y)
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    opt.zero_grad(set_to_none=True)
    out = {"weights": sum(params.values()), "activations": sum(saved.values()), "gradients": grads,
           "optimizer_state": moments}
    out["total"] = sum(out.values())
    return out


# ---- runs --------------------------------------------------------------------------------------


def load_examples(base_config: dict, sft_data, sft_val, data_dir, sizes: dict, seed: int,
                  base_dir="the base model") -> tuple[list, list, dict]:
    """Training and held-out examples: the user's JSONL files, or questions about the base's story world."""
    from .runs import sha256_file
    if sft_data:
        train_ex = read_sft_jsonl(sft_data)
        if sft_val:
            val_ex = read_sft_jsonl(sft_val)
        else:
            if len(train_ex) < 2:
                raise ValueError(f"{sft_data}: {len(train_ex)} example; without --sft-val it needs at least 2 (one "
                                 "to train on, one to validate)")
            train_ex, val_ex = split_user_examples(train_ex, seed)
        return train_ex, val_ex, {"kind": "jsonl", "train": str(sft_data), "val": str(sft_val) if sft_val else None,
                                  "train_sha256": sha256_file(sft_data),
                                  "val_sha256": sha256_file(sft_val) if sft_val else None}
    data = base_config.get("data", {})
    if data.get("kind") != "stories":
        raise ValueError("the base model was not trained on the story world, so there is no built-in question set; "
                         "pass your own with --sft-data FILE.jsonl")
    paths = build_sft_data(data_dir, World.from_dict(data["world"], f"the base model {base_dir}"), sizes, seed)
    return (read_sft_jsonl(paths["train"]), read_sft_jsonl(paths["val"]),
            {"kind": "stories", "train": str(paths["train"]), "val": str(paths["val"]), "sizes": sizes,
             "train_sha256": sha256_file(paths["train"]), "val_sha256": sha256_file(paths["val"])})


def fitting(tokenizer, examples: list[dict], context: int) -> tuple[list[dict], list, int]:
    """(examples that fit the context, their encodings, how many were skipped)."""
    kept, encoded = [], []
    for ex in examples:
        enc, skipped = encode_examples(tokenizer, [ex], context)
        if not skipped:
            kept.append(ex)
            encoded += enc
    return kept, encoded, len(examples) - len(kept)


def load_lora_run(lora_dir: str | Path, device="cpu", base_dir: str | Path | None = None):
    """(model with the run's adapter loaded, unmerged; tokenizer; base config; LoRA run config)."""
    from .lora import load_adapter, read_adapter_config
    from .runs import holds_run, load_run
    lora_dir = Path(lora_dir)
    adapter_dir = lora_dir if (lora_dir / "adapter_config.json").exists() else lora_dir / "adapter"
    run_folder = adapter_dir.resolve().parent  # resolved: `--adapter .` inside adapter/ has a parent too
    if (lora_dir / "config.json").is_file() and not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter here (adapter_config.json is missing); a LoRA run writes it "
                              "when training ends: finish the run with --resume, or pass a finished LoRA run folder")
    run_config = {}
    if adapter_dir != lora_dir or holds_run(run_folder):  # a run folder, or the adapter/ folder of one
        run_config = load_json(run_folder / "config.json", "LoRA run config")
        if adapter_dir == lora_dir and run_config.get("kind") != "lora":
            run_config = {}
    if base_dir is not None:  # the caller's
        if not Path(base_dir).is_dir():
            raise ValueError(f"{base_dir}: no such model folder (the base given for {lora_dir})")
    else:
        base_dir, beside = run_config.get("base"), run_config.get("base_from_run")
        if base_dir is not None and not isinstance(base_dir, str):
            raise CheckpointError(f"{run_folder / 'config.json'}: \"base\" must be the base model's folder, got "
                                  f"{base_dir!r}; the file is damaged")
        if isinstance(beside, str) and (run_folder / beside).is_dir():  # where the base was, seen from the run
            base_dir = run_folder / beside
        if base_dir is None:
            raise ValueError(f"{adapter_dir}: which base model does this adapter belong to? pass its model folder "
                             "(--run-dir for sample, --base for merge)")
        if not Path(base_dir).is_dir():
            raise ValueError(f"the base model folder {base_dir} named by {lora_dir} is missing (a relative path is "
                             "read from the folder the run was trained in); pass the base's folder: --run-dir for "
                             "sample, --base for merge")
    model, tokenizer, base_config = load_run(base_dir, device)
    lora = lora_config_from_dict(read_adapter_config(adapter_dir))
    try:
        prepare_model(model, lora)
    except ValueError as e:  # targets or a rank this base does not have
        raise CheckpointError(f"{adapter_dir / 'adapter_config.json'}: {e}") from None
    load_adapter(model, adapter_dir)
    return model.eval(), tokenizer, base_config, {**run_config, "base": str(base_dir)} if run_config else run_config


def _flags(run_config: dict) -> dict:
    """A fine-tuning run's LoRA and training settings, named as their flags are."""
    lora = {("lora_dropout" if k == "dropout" else k): v for k, v in (run_config.get("lora") or {}).items()}
    return {**lora, **run_config.get("train", {})}


def run_finetune(base_dir, run_dir, lora: LoRAConfig | None, cfg: TrainConfig, *, sft_data=None, sft_val=None,
                 data_dir="data", sizes=SFT_SPLITS, device="cpu", resume=False, overwrite=False,
                 progress=True) -> dict:
    """Fine-tune the model folder `base_dir` into `run_dir`: LoRA when `lora` is given, else every weight."""
    from .checkpoint import save_weights
    from .lora import base_fingerprint, parameter_report, save_adapter
    from .plots import plot_finetune_loss
    from .runs import (UsageError, check_run_dir, load_run, peak_rss_mib, prepare_run_dir, provenance, same_or_inside,
                       sha256_file)
    from .train import read_metrics, train
    run_dir, kind = Path(run_dir), "lora" if lora else "full"
    if same_or_inside(run_dir, base_dir):
        raise UsageError(f"--run-dir {run_dir} is or holds the base model's folder ({base_dir}): the run would "
                         "replace its own base; choose another --run-dir")
    check_run_dir(run_dir, resume, overwrite)  # refuse at once; the folder is touched only once all inputs are read
    model, tokenizer, base_config = load_run(base_dir, device)
    if lora:  # before anything is measured or written: --overwrite must not lose a run to a bad --targets
        check_lora_targets(model, lora.targets, lora.r)
    train_ex, val_ex, sft_info = load_examples(base_config, sft_data, sft_val, data_dir, sizes, cfg.seed, base_dir)
    ctx = model.config.context_length
    train_ex, train_enc, skipped_train = fitting(tokenizer, train_ex, ctx)
    val_ex, val_enc, skipped_val = fitting(tokenizer, val_ex, ctx)
    if skipped_train or skipped_val:
        print(f"skipped {skipped_train} training and {skipped_val} held-out examples longer than the context "
              f"({ctx} tokens); they are never cut")
    if not train_enc or not val_enc:
        which = "training" if not train_enc else "held-out"
        raise ValueError(f"no {which} example fits the model's context of {ctx} tokens (data: {sft_info['train']}); "
                         "shorter examples are needed")
    print(f"data    {len(train_ex):,} training and {len(val_ex):,} held-out questions ({sft_info['train']})")

    pack = packing_context(model, tokenizer.eot_id)
    # the base as given (from the working folder) and from the run folder, for use from anywhere later
    try:  # in '/' form, which every system reads
        from_run = Path(os.path.relpath(Path(base_dir).resolve(), run_dir.resolve())).as_posix()
    except ValueError:  # on Windows, another drive than the run's: there is no relative path
        from_run = None
    config = {"kind": kind, "base": str(base_dir), "base_from_run": from_run,
              "base_fingerprint": base_fingerprint(model),
              "lora": dataclasses.asdict(lora) if lora else None, "train": dataclasses.asdict(cfg), "sft": sft_info,
              "packed_rows": pack,
              "tokenizer": {"n_vocab": tokenizer.n_vocab, "sha256": sha256_file(Path(base_dir) / "tokenizer.json")}}
    if resume:
        saved = load_json(run_dir / "config.json", "run config")
        for key in ("kind", "base_fingerprint", "sft", "packed_rows"):
            if json.loads(json.dumps(config[key])) != saved.get(key):
                raise ValueError(f"--resume: {key} differs from the run in {run_dir} ({saved.get(key)!r}); "
                                 "resume with the same settings or start a new --run-dir")
        if changed := changed_settings(_flags(saved), _flags(json.loads(json.dumps(config)))):
            raise ValueError(f"--resume: {run_dir} was trained with other settings: {changed}; resume with the same "
                             "flags, or start again with --overwrite")
    prepare_run_dir(run_dir, resume, overwrite)
    torch.manual_seed(cfg.seed)
    base_acc, base_answers = accuracy(model, tokenizer, val_ex)
    print(f"before  exact match of the base model on the held-out questions: {base_acc:.1%}")

    prepare_model(model, lora)
    print(f"{kind:8s}{parameter_report(model)}")
    if kind == "full":  # a model folder: loadable by `microlm sample` and as the base of another fine-tune
        config = {**{k: base_config[k] for k in ("model", "data", "tokenizer") if k in base_config}, **config}
        tokenizer.save(run_dir / "tokenizer.json")
    save_json(run_dir / "config.json", {**config, "provenance": provenance(cfg.seed)})

    val_batches = fixed_batches(val_enc, tokenizer.eot_id)
    summary = train(model, cfg,
                    get_batch=lambda i: sft_batch(train_enc, cfg.batch_size, tokenizer.eot_id, cfg.seed, i, pack),
                    evaluate=lambda m: answer_loss(m, val_batches), run_dir=run_dir, resume=resume,
                    progress=progress)
    model.eval()
    if lora:
        adapter = save_adapter(model, run_dir / "adapter")
        size = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
        print(f"saved   {run_dir}/adapter: {adapter['n_params']:,} parameters, {size / 1024:.1f} KiB")
    else:
        save_weights(run_dir / "model.safetensors", model)
    acc, answers = accuracy(model, tokenizer, val_ex)
    print(f"after   exact match on the held-out questions: {acc:.1%} (base model: {base_acc:.1%})")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {"kind": kind, "accuracy": acc, "base_accuracy": base_acc, "accuracy_by_kind": accuracy_by_kind(answers, val_ex),
              "val_loss": summary["val_loss"], "steps": summary["steps"], "train_seconds": summary["train_seconds"],
              "step_seconds": summary["train_seconds"] / max(1, summary["steps"]),
              "trainable_params": n_trainable, "total_params": sum(p.numel() for p in model.parameters()),
              "n_train": len(train_ex), "n_val": len(val_ex), "peak_rss_mib": peak_rss_mib()}
    save_text(run_dir / "answers.jsonl", "".join(
        json.dumps({"prompt": ex["prompt"], "reference": ex["response"], "answer": a, "base_answer": b}) + "\n"
        for ex, a, b in zip(val_ex, answers, base_answers)))
    save_json(run_dir / "summary.json", result)
    plot_finetune_loss({kind: read_metrics(run_dir / "metrics.jsonl")}, run_dir / "loss.png")
    return result


def merge_adapter(lora_dir, out_dir, base_dir=None, overwrite=False) -> Path:
    """Fold a LoRA run's adapter into its base and write a standalone model folder."""
    from .checkpoint import save_weights
    from .lora import lora_layers, merge_and_unload
    from .runs import UsageError, check_run_dir, provenance, same_or_inside
    model, tokenizer, base_config, run_config = load_lora_run(lora_dir, "cpu", base_dir)
    base_dir = base_dir or run_config.get("base")
    out = Path(out_dir).resolve()
    for what, folder in (("the adapter's run folder", lora_dir), ("its base model's folder", base_dir)):
        if same_or_inside(out, folder):
            raise UsageError(f"--out {out_dir} is or holds {what} ({folder}): the merged model would replace its own "
                             "input; choose another --out")
    check_run_dir(Path(out_dir), resume=False, overwrite=overwrite, flag="--out")
    merge_and_unload(model)
    assert not lora_layers(model)
    config = {k: base_config[k] for k in ("model", "data", "tokenizer") if k in base_config}
    config["merged_from"] = {"adapter": str(lora_dir), "base": str(base_dir),
                             "lora": run_config.get("lora")}
    # Written into a new hidden folder beside --out, then swapped in whole: an interrupted merge leaves --out as
    # it was. (Unique names: a folder of the user's called OUT.tmp or OUT.old is never touched.)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.writing-"))
    try:
        tokenizer.save(tmp / "tokenizer.json")
        save_weights(tmp / "model.safetensors", model)
        save_json(tmp / "config.json", {**config, "provenance": provenance(None)})  # None: merging draws nothing
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))  # for the run replaced
        aside.rmdir()
        replace_dir(tmp, out, old=aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(out_dir)
