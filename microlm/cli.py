"""`microlm ...`: the command line. The only module that parses arguments.

    microlm pretrain            build the story corpus, train the tokenizer and the model (runs/pretrain)
    microlm pretrain --corpus my.txt --run-dir runs/mine    the same on any UTF-8 text file
    microlm sample --run-dir runs/pretrain --prompt "Ann"   generate from a trained run
    microlm lora-finetune       LoRA on the question set, from runs/pretrain (runs/lora)
    microlm finetune --full     the full fine-tuning baseline, same data and budget (runs/full)
    microlm compare             LoRA vs base vs merged vs full: compare.json, plots, table
    microlm merge               fold an adapter into its base: a standalone model folder
    microlm report              a finished run's results as markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .checkpoint import CheckpointError, load_json
from .data import CorpusError
from .finetune import SFT_SPLITS, LoRAConfig, finetune_defaults
from .malloc import keep_freed_memory
from .model import GPTConfig, pick_device
from .pretrain import PROBE_LABELS, STORY_SPLITS, probe_row, run_pretrain
from .runs import UsageError, load_run
from .sft import SFTDataError
from .train import TrainConfig, TrainingDiverged, TrainingInterrupted
from .world import World, log_prob

# Help for every dataclass field that becomes a flag.
HELP = {
    "max_steps": "optimizer steps", "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate",
    "min_lr_ratio": "final lr as a fraction of the peak (cosine decay)", "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay (matrices only)", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0: off)", "eval_every": "validate every N steps",
    "checkpoint_every": "save a resumable checkpoint every N steps", "seed": "seed for init, batches and data",
    "compile": "torch.compile the training step (needs a C++ compiler; about half a minute to compile on "
               "2 cores, then faster)",
    "vocab_size": "tokenizer vocabulary size, special tokens included", "context_length": "tokens per window",
    "d_model": "model width", "n_layers": "transformer blocks", "n_heads": "attention heads",
    "d_ff": "SwiGLU hidden size (0: about 8/3 of d_model)", "rope_base": "RoPE frequency base",
    "tie_embeddings": "share the input embedding and the output head", "norm_eps": "RMSNorm epsilon",
    "qk_norm": "RMS-normalise queries and keys per head",
    "attn_scale": "attention scores are q.k * attn_scale / sqrt(head_dim)",
    "conv_kernel": "positions each block's short convolutions mix into attention's and the feed-forward's "
                   "input (0: none, a plain transformer)",
}

def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=(), defaults=None) -> None:
    """One flag per field of dataclass `cls`, defaulting to the field's value in `defaults` (an instance)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if f.type in ("bool", bool):
            parser.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL",
                                help=f"{HELP.get(f.name, '')} (default: {default})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), type(default))
            parser.add_argument(flag, type=kind, default=default, help=f"{HELP.get(f.name, '')} (default: {default})")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microlm", description="A from-scratch micro language model with a LoRA stage.")
    p.add_argument("--version", action="version", version=f"microlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser("pretrain", help="train the tokenizer and a small GPT from scratch",
                         description="Build the story corpus (or read --corpus), train a byte-level BPE tokenizer, "
                                     "pretrain a GPT, then evaluate, plot and sample. Output: --run-dir, a model "
                                     "folder (config.json, tokenizer.json, model.safetensors) with metrics.jsonl, "
                                     "checkpoint/, loss.png, samples.txt and summary.json; the corpus goes to "
                                     "--data-dir (train.txt, val.txt, stats.json; replaced if there).")
    pre.add_argument("--run-dir", default="runs/pretrain", help="output folder (default: runs/pretrain)")
    pre.add_argument("--corpus", help="train on this UTF-8 text file instead of the story world (no bound then)")
    pre.add_argument("--data-dir", default="data", help="where the story corpus is written (default: data)")
    pre.add_argument("--n-train", type=int, default=STORY_SPLITS["train"], help="training stories, without --corpus "
                     "(default: %(default)s)")
    pre.add_argument("--n-val", type=int, default=STORY_SPLITS["val"], help="validation stories, without --corpus "
                     "(default: %(default)s)")
    pre.add_argument("--tokenizer", choices=("trained", "gpt2"), default="trained",
                     help="trained: BPE trained here on the corpus (default); gpt2: tiktoken's stock encoding, "
                          "only if it is already in tiktoken's cache (microlm never downloads)")
    pre.add_argument("--n-samples", type=int, default=200, help="stories sampled at the end and scored (default: 200)")
    pre.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    pre.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    pre.add_argument("--overwrite", action="store_true", help="delete what --run-dir holds and start again")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    add_dataclass_flags(pre, GPTConfig, skip=("eot_id",))
    add_dataclass_flags(pre, TrainConfig)

    sam = sub.add_parser("sample", help="generate text from a trained run",
                         description="Sample from the model in --run-dir. Each sample runs until the model writes "
                                     "the end-of-text token or fills its context; stories from the story world are "
                                     "scored (valid or not, and their bits under the world's exact probabilities).")
    sam.add_argument("--run-dir", default=None, help="a model folder (default: runs/pretrain, or the base "
                                                     "of --adapter)")
    sam.add_argument("--adapter", help="sample through this LoRA adapter, unmerged (a LoRA run folder or its "
                                       "adapter/ folder)")
    sam.add_argument("--prompt", default="", help="text to continue (default: start a new document); \\n stands "
                     "for a newline, as in a question for a fine-tuned adapter: 'STORY\\nQ: Where is Ben?\\nA:'")
    sam.add_argument("--n", type=int, default=5, help="how many samples (default: 5)")
    sam.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    sam.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    sam.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    sam.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    sam.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt longer than the "
                     "model's context, and say so (default: refuse it)")
    sam.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")

    for name, full in (("lora-finetune", False), ("finetune", None)):
        helps = {"lora-finetune": "LoRA fine-tuning on the question set (the same as finetune without --full)",
                 "finetune": "fine-tune a model folder: LoRA (default) or every weight with --full"}
        how = ("The base is frozen and only the adapters' A and B train" +
               ("; --full trains every weight (the baseline). Same data, batch and steps either way" if full is None
                else ". `microlm finetune --full` trains every weight on the same data, batch and steps"))
        out = ("config.json, adapter/ (adapter_config.json, adapter_model.safetensors)" if full is False else
               "config.json and adapter/ for LoRA; with --full a model folder (config.json, tokenizer.json, "
               "model.safetensors)")
        ft = sub.add_parser(name, help=helps[name], description=f"{helps[name]}. {how}. Output: --run-dir: {out}, "
                            "metrics.jsonl, checkpoint/, answers.jsonl, loss.png, summary.json; the built-in "
                            "questions go to --data-dir (sft_train.jsonl, sft_val.jsonl, sft_stats.json).")
        if full is None:
            ft.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters (the "
                            "LoRA flags --r, --alpha, --lora-dropout, --use-rslora and --targets are then not used)")
        ft.add_argument("--base", default="runs/pretrain", help="the model folder to start from: a pretrain run, "
                        "a full fine-tune or a merged model (default: runs/pretrain)")
        ft.add_argument("--run-dir", default=None, help="output folder (default: runs/lora"
                        + (", or runs/full with --full)" if full is None else ")"))
        ft.add_argument("--sft-data", help="your own questions: JSONL with {\"prompt\": ..., \"response\": ...} "
                        "per line (default: questions about the base's story world, written to --data-dir)")
        ft.add_argument("--sft-val", help="held-out JSONL for --sft-data (default: a seeded 10%% of --sft-data)")
        ft.add_argument("--data-dir", default="data", help="where the question set is written (default: data)")
        ft.add_argument("--n-train", type=int, default=SFT_SPLITS["train"], help="training questions (default: %(default)s)")
        ft.add_argument("--n-val", type=int, default=SFT_SPLITS["val"], help="held-out questions (default: %(default)s)")
        ft.add_argument("--r", "--rank", dest="r", type=int, default=LoRAConfig.r, help="LoRA rank (default: %(default)s)")
        ft.add_argument("--alpha", type=float, default=LoRAConfig.alpha, help="LoRA alpha; scaling = alpha / r "
                        "(default: %(default)s)")
        ft.add_argument("--lora-dropout", type=float, default=LoRAConfig.dropout, help="dropout on the LoRA input "
                        "(default: %(default)s)")
        ft.add_argument("--use-rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
        ft.add_argument("--targets", default=",".join(LoRAConfig().targets),
                        help="comma-separated names of the linear layers to adapt (default: %(default)s)")
        ft.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 7e-3"
                        + (" for LoRA, 1e-3 for --full)" if full is None else ")"))
        add_dataclass_flags(ft, TrainConfig, skip=("lr",), defaults=finetune_defaults(full=False))
        ft.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
        ft.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
        ft.add_argument("--overwrite", action="store_true", help="delete what --run-dir holds and start again")
        ft.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")

    cmp = sub.add_parser("compare", help="measure LoRA against its base, merged, and full fine-tuning",
                         description="Exact match of base / LoRA unmerged / merged / merge_and_unload / full "
                                     "fine-tune; merged vs unmerged logits (fp32 and float64) and greedy answers; "
                                     "latency, file sizes, step time and memory; a rank sweep. Writes "
                                     "compare.json and PNG plots into the LoRA run folder and prints a table.")
    cmp.add_argument("--lora", default="runs/lora", help="a LoRA run folder (default: runs/lora)")
    cmp.add_argument("--full", default="runs/full", help="a full fine-tune folder, or 'none' (default: runs/full)")
    cmp.add_argument("--sweep-ranks", default="1,8,32",
                     help="ranks to train at the same budget for the rank sweep ('' for none; default: %(default)s: "
                          "each other rank is one more LoRA run, about 2 minutes on 2 cores)")
    cmp.add_argument("--latency-tokens", type=int, default=64, help="tokens generated per latency measurement (default: 64)")
    cmp.add_argument("--repeats", type=int, default=21, help="repeats of each per-token latency timing (median "
                     "reported; default: 21; the training-step timing takes 9)")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bars")

    mer = sub.add_parser("merge", help="fold a LoRA adapter into its base: a standalone model folder",
                         description="Load the base named by the LoRA run, add scaling * B @ A into each adapted "
                                     "weight (summed in float64, rounded once), put plain Linear layers back and write a model folder that "
                                     "`microlm sample` loads and `microlm finetune --base` starts from.")
    mer.add_argument("--adapter", default="runs/lora", help="a LoRA run folder (default: runs/lora)")
    mer.add_argument("--base", default=None, help="its base model folder (default: the one the run names)")
    mer.add_argument("--out", default="runs/lora-merged", help="output model folder (default: runs/lora-merged)")
    mer.add_argument("--overwrite", action="store_true", help="replace what --out holds")

    rep = sub.add_parser("report", help="print a run's results as a markdown table (for the README)",
                         description="Read summary.json of a finished run and print its results as markdown.")
    rep.add_argument("--run-dir", default="runs/pretrain", help="a finished run folder: pretraining, or a LoRA or "
                     "full fine-tune (runs/lora, runs/full) (default: runs/pretrain)")
    return p


# ---- pretrain ----------------------------------------------------------------------------------


def cmd_pretrain(args) -> int:
    if args.n_samples < 0 or args.n_train < 1 or args.n_val < 1:
        raise UsageError("--n-train and --n-val must be >= 1 and --n-samples >= 0")
    train_cfg = from_args(TrainConfig, args)
    try:
        model_cfg = from_args(GPTConfig, args)  # vocab_size is the tokenizer's request; the model gets its n_vocab
    except ValueError as e:  # name the flag the user typed, not the dataclass field
        raise UsageError(re.sub(r"GPTConfig\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(e))) from None
    run_pretrain(args.run_dir, model_cfg, train_cfg, corpus=args.corpus, data_dir=args.data_dir,
                 sizes={"train": args.n_train, "val": args.n_val}, tokenizer_name=args.tokenizer,
                 n_samples=args.n_samples, device=pick_device(args.device), resume=args.resume,
                 overwrite=args.overwrite, progress=not args.no_progress)
    return 0


# ---- sample ------------------------------------------------------------------------------------


def cmd_sample(args) -> int:
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    from .evaluate import fit_prompt, sample_texts
    from .generate import check_sampling_args
    try:  # before the model is loaded, and named as the flags are
        check_sampling_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        name, rest = str(e).replace("(or None for no limit)", "(leave it out for no limit)").split(" ", 1)
        raise UsageError(f"--{name.replace('_', '-')} {rest}") from None
    if args.adapter:
        from .finetune import load_lora_run
        model, tokenizer, config, _ = load_lora_run(args.adapter, pick_device(args.device), args.run_dir)
    else:
        model, tokenizer, config = load_run(args.run_dir or "runs/pretrain", pick_device(args.device))
    # A shell passes "\n" as two characters; the question prompts of the fine-tuning set need a newline.
    prompt = args.prompt.replace("\\n", "\n")
    _, dropped = fit_prompt(tokenizer, prompt, model.config.context_length, args.truncate_prompt)
    if dropped:
        print(f"note: the prompt is longer than the model's context ({model.config.context_length} tokens); the model "
              f"sees only its last {model.config.context_length - 1} tokens (the first {dropped} are dropped)",
              file=sys.stderr)
    data = config.get("data", {})
    # Stories are one line: a prompt with a newline (a question and its answer) is not scored as one.
    world = World.from_dict(data["world"], f"the model in {args.adapter or args.run_dir or 'runs/pretrain'}") \
        if data.get("kind") == "stories" and "\n" not in prompt else None
    for text in sample_texts(model, tokenizer, args.n, args.temperature, args.top_k, args.top_p, args.seed,
                             prompt=prompt, truncate_prompt=args.truncate_prompt):
        if world:
            lp = log_prob(world, text)
            tag = f"[valid, {-lp / math.log(2):.1f} bits]" if lp > -math.inf else "[INVALID]"
            print(tag, text.replace("\n", "\\n"))  # a story is one line; show any stray newline
        else:
            print(text)
            print("-" * 40)
    return 0


def cmd_report(args) -> int:
    run_dir = Path(args.run_dir)
    path = run_dir / "summary.json"
    s = load_json(path, "run summary (is the run finished?)")
    try:
        rows = finetune_rows(s) if s.get("kind") in ("lora", "full") else pretrain_rows(s)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:  # missing, or of the wrong type
        raise CheckpointError(f"{path}: cannot read {type(e).__name__}: {e} from it; the file is damaged or was not "
                              "written by this version of microlm") from None
    print(f"| {run_dir} | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


def pretrain_rows(s: dict) -> list[tuple[str, str]]:
    rows = [("validation loss", f"{s['val_loss']:.4f} nats/token (perplexity {s['val_ppl']:.3f})"),
            ("validation bits/char", f"{s['val_bpc']:.4f}")]
    if "bound_bpc" in s:
        target = "met" if s["bpc_over_bound"] <= 1.15 else "not met"
        rows += [("exact entropy bound", f"{s['bound_bpc']:.4f} bits/char"),
                 ("model / bound", f"{s['bpc_over_bound']:.3f} (target <= 1.15: {target})")]
    if "sample_validity" in s:
        target = "met" if s["sample_validity"] >= 0.95 else "not met"
        rows.append(("valid samples (T = 1.0)", f"{s['sample_validity']:.1%} of {s['n_samples']} (target >= 95%: {target})"))
    for name, c in s.get("lookups", {}).items():
        rows.append((f"look-up: {name}", f"{c['accuracy']:.1%} of {c['total']} restated facts"))
    for what, p in s.get("key_probes", {}).items():
        rows.append((f"probe: {PROBE_LABELS[what]}", probe_row(p)))
    return rows + [("training", f"{s['steps']} steps, {s['tokens_seen']:,} tokens, {s['train_seconds']:.0f} s"),
                   ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s"),
                   ("model FLOP utilisation", f"{s['mfu']:.1%} of {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s "
                                              "(fp32 matmul peak measured in the same process)")]


def finetune_rows(s: dict) -> list[tuple[str, str]]:
    """A LoRA or full fine-tuning run's summary (`microlm compare` sets the two side by side)."""
    base = s["total_params"] - s["trainable_params"] if s["kind"] == "lora" else s["total_params"]  # + the adapter
    kinds = ", ".join(f"{k} {v:.1%}" for k, v in sorted(s.get("accuracy_by_kind", {}).items()))
    return [("fine-tuning", "LoRA" if s["kind"] == "lora" else "full (every weight)"),
            (f"exact match, {s['n_val']} held-out questions", f"{s['accuracy']:.1%} (the base model: "
                                                              f"{s['base_accuracy']:.1%})" + (f"; {kinds}" if kinds else "")),
            ("held-out answer loss", f"{s['val_loss']:.4f} nats/token"),
            ("trainable parameters", f"{s['trainable_params']:,} ({s['trainable_params'] / base:.2%} of the base "
                                     f"model's {base:,})"),
            ("training", f"{s['steps']} steps on {s['n_train']:,} questions, {s['train_seconds']:.0f} s "
                         f"({s['step_seconds'] * 1e3:.1f} ms a step)")]


# ---- fine-tuning -------------------------------------------------------------------------------


def cmd_finetune(args) -> int:
    from .finetune import run_finetune
    full = getattr(args, "full", False)
    lr = finetune_defaults(full).lr if args.lr is None else args.lr  # an explicit --lr 0 is refused, not replaced
    cfg = from_args(TrainConfig, argparse.Namespace(**{**vars(args), "lr": lr}))
    if args.n_train < 1 or args.n_val < 1:
        raise UsageError("--n-train and --n-val must be >= 1")
    if args.sft_val and not args.sft_data:
        raise UsageError("--sft-val needs --sft-data (the built-in question set has its own held-out split)")
    lora = None
    if full:
        lora_flags = {"r": LoRAConfig.r, "alpha": LoRAConfig.alpha, "lora_dropout": LoRAConfig.dropout,
                      "use_rslora": False, "targets": ",".join(LoRAConfig().targets)}
        if given := [f"--{k.replace('_', '-')}" for k, default in lora_flags.items() if getattr(args, k) != default]:
            # a note, not an error: `make lora-finetune ARGS=...` passes the same flags to both runs
            print(f"note: {', '.join(given)} set LoRA up; --full trains every weight and does not use them")
    else:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        if args.r < 1:
            raise UsageError(f"--r must be >= 1 (a LoRA rank), got {args.r}")
        if not 0 < args.alpha < math.inf:
            raise UsageError(f"--alpha must be a finite number > 0 (scaling = alpha / r), got {args.alpha}")
        if not 0 <= args.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
        lora = LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.lora_dropout, use_rslora=args.use_rslora,
                          targets=targets)
    run_dir = args.run_dir or ("runs/full" if full else "runs/lora")
    run_finetune(args.base, run_dir, lora, cfg, sft_data=args.sft_data, sft_val=args.sft_val,
                 data_dir=args.data_dir, sizes={"train": args.n_train, "val": args.n_val},
                 device=pick_device(args.device), resume=args.resume, overwrite=args.overwrite,
                 progress=not args.no_progress)
    print(f"wrote   {run_dir}/: " + ("adapter/, " if lora else "model.safetensors, tokenizer.json, ")
          + "config.json, metrics.jsonl, answers.jsonl, loss.png, summary.json")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_table, run_compare
    try:
        ranks = [int(r) for r in args.sweep_ranks.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--sweep-ranks must be comma-separated integers, got {args.sweep_ranks!r}") from None
    if args.latency_tokens < 1 or args.repeats < 1:
        raise UsageError("--latency-tokens and --repeats must be >= 1")
    full = None if args.full.lower() == "none" else args.full
    if full and not Path(full).is_dir():
        raise UsageError(f"--full {full}: no such folder; run `microlm finetune --full` first, or pass --full none")
    res = run_compare(args.lora, full, sweep_ranks=ranks, latency_tokens=args.latency_tokens, repeats=args.repeats,
                      progress=not args.no_progress)
    print(compare_table(res))
    print(f"wrote   {args.lora}/compare.json, param_counts.png, finetune_loss.png, "
          + ("rank_sweep.png, " if ranks else "") + "latency.png")
    return 0


def cmd_merge(args) -> int:
    from .finetune import merge_adapter
    out = merge_adapter(args.adapter, args.out, args.base, args.overwrite)
    print(f"wrote   {out}/: model.safetensors, config.json, tokenizer.json (a plain model: "
          f"`microlm sample --run-dir {out}`)")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # a training step then reuses the last step's memory instead of page-faulting anew
    # Ctrl-C and `kill` both save a checkpoint and exit (a shell starts background jobs with SIGINT
    # ignored, so restore it explicitly).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    commands = {"pretrain": cmd_pretrain, "sample": cmd_sample, "report": cmd_report, "finetune": cmd_finetune,
                "lora-finetune": cmd_finetune, "compare": cmd_compare, "merge": cmd_merge}
    try:
        return commands[args.command](args)
    except TrainingInterrupted as e:
        print(f"\ninterrupted: checkpoint saved at step {e.step}; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the training loop: building data, sampling, evaluating, comparing
        hint = ("; a run folder that was started continues with the same command plus --resume"
                if args.command in ("pretrain", "finetune", "lora-finetune") else "")
        print(f"\ninterrupted: every file written so far is whole (each is written aside, then renamed){hint}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's final flush must not fail too
        if args.command in ("sample", "report"):  # `microlm sample | head -1`: stop quietly, as `cat` would
            return 141  # 128 + SIGPIPE, what a shell reports for a program the broken pipe stopped
        print("error: the program reading microlm's output exited, so microlm stopped too; a run folder that "
              "was started continues with the same command plus --resume (or --overwrite)", file=sys.stderr)
        return 2
    except (UsageError, CorpusError, CheckpointError, SFTDataError, TrainingDiverged, ValueError, OSError,
            RuntimeError) as e:
        if os.environ.get("MICROLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
