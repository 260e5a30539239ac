"""`make bench`: how fast microlm is on this machine, each figure measured side by side and quoted as a ratio.

    python benchmarks/run.py                       everything at `make pretrain`'s sizes (minutes)
    python benchmarks/run.py --quick               tiny sizes (seconds): checks that every benchmark runs
    python benchmarks/run.py --only training,lora  some sections

One module per section, in the order of the story (corpus -> tokenizer -> model -> training -> LoRA):

    bench_tokenizer.py   BPE training time; tiktoken vs plain-Python encoding, identical ids
    bench_training.py    tokens/s and MFU at three sizes, against a GPT-2-style baseline (baseline.py); torch.compile
    bench_generation.py  KV cache vs recomputing the prefix
    bench_lora.py        LoRA vs full fine-tuning step time and memory; merged / unmerged latency vs base
    bench_memory.py      peak RSS of `make pretrain` and `make lora-finetune`, from their summary.json

timing.py says how: contenders take turns in one process, warm-up first, median of repeats with
min and max. Targets from the issue are marked met or not; a benchmark never fails on a number. It
exits non-zero only when a section crashes or tiktoken and plain Python disagree on the ids.
Output: --out (JSON, written atomically) and --md (the markdown table, also printed). A run of every
section writes them into results/ and the table into the README, between two marker lines
(report.README_START/END), so the README's numbers are always a whole run's; --quick, --only,
--no-compile and --no-readme leave the README and results/ alone (readme_refusal says which) and write
into runs/bench/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_generation import bench_generation
from bench_lora import bench_lora
from bench_memory import bench_memory
from bench_tokenizer import bench_tokenizer, story_bpe, story_corpus
from bench_training import bench_training
from microlm.checkpoint import save_json, save_text
from microlm.pretrain import STORY_SPLITS
from microlm.malloc import keep_freed_memory
from microlm.model import GPTConfig
from microlm.tokenizer import Tokenizer
from microlm.train import TrainConfig
from report import readme_with_table, to_markdown
from timing import machine

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("tokenizer", "training", "generation", "lora", "memory")


@dataclass(frozen=True)
class Settings:
    """How big each benchmark is. The defaults are `make pretrain`'s: GPTConfig and TrainConfig as they are."""

    repeats: int = 7
    n_stories: int = STORY_SPLITS["train"]  # the pretraining corpus
    encode_chars: int = 2_000_000  # plain Python encodes a few MB/s: 2 MB keeps a repeat to about a second
    model: dict = field(default_factory=dict)  # changes to GPTConfig's defaults: the "default" size
    # The training sizes: changes to `model`. The large one is about 6x the default's parameters.
    sizes: dict = field(default_factory=lambda: {"small": {"d_model": 64, "n_layers": 2, "n_heads": 2}, "default": {},
                                                 "large": {"d_model": 256, "n_layers": 6, "n_heads": 8}})
    batch_size: int = TrainConfig().batch_size
    gen_lengths: tuple = (64, 256, 512)  # new tokens; the context caps them
    gen_batch: int = 50  # rows for the batched generation figure: make pretrain samples 50 at a time
    latency_tokens: int = 64  # tokens generated per LoRA latency measurement, as `microlm compare`
    compile: bool = True  # try torch.compile at the default size


FULL = Settings()
QUICK = Settings(repeats=3, n_stories=300, encode_chars=50_000,
                 model={"d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 32},
                 sizes={"small": {"d_model": 16, "n_layers": 1}, "default": {}, "large": {"d_model": 64, "n_heads": 4}},
                 batch_size=4, gen_lengths=(8, 16, 64), gen_batch=4, latency_tokens=8, compile=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py",
                                description="Measure microlm's training, generation, LoRA and tokenizer speed, "
                                            "each figure side by side and quoted as a ratio.",
                                epilog="Targets are from issue 5; they are reported, never enforced.")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds: checks that everything runs; "
                                                        "the numbers mean nothing")
    # Defaults in the repository, wherever the command runs from. results/ holds what the README shows, so
    # only a run that writes the README writes there by default; the others go to runs/bench/.
    p.add_argument("--out", default=None, help="JSON results (default: results/bench.json in the repository for "
                   "a run that also writes the README, runs/bench/bench.json for the others)")
    p.add_argument("--md", default=None, help="markdown table (default: bench.md beside the JSON's default)")
    p.add_argument("--only", default=None, help=f"comma-separated sections (default: all of {','.join(SECTIONS)})")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default: 7, --quick 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, usually one "
                                                             "per core; --quick: 1)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (on CPU it compiles for about half a minute, or longer)")
    p.add_argument("--readme", default=str(ROOT / "README.md"),
                   help="the README whose benchmark table a full run rewrites (default: the repository's)")
    p.add_argument("--no-readme", action="store_true",
                   help="leave the README alone (--quick, --only and --no-compile always do)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where `make pretrain` and `make lora-finetune` "
                   "wrote their runs, for their peak memory (default: runs/ in the repository)")
    return p


def readme_refusal(args: argparse.Namespace) -> str | None:
    """Why this run's table must not go into the README, or None when it may: only a run of every
    section, compile included, at full size stands there (the table states its repeats and threads)."""
    if args.no_readme:
        return "as --no-readme asks"
    for flag, given in (("--quick", args.quick), ("--only", args.only is not None), ("--no-compile", args.no_compile)):
        if given:
            return f"{flag}: only a full run of every section goes there"
    return None


def output_paths(args: argparse.Namespace) -> tuple[str, str]:
    """--out and --md, or their defaults: results/ for a run that writes the README (results/bench.md is
    the README's table), runs/bench/ for any other, whose numbers must not pass for the README's."""
    folder = ROOT / ("results" if readme_refusal(args) is None else "runs/bench")
    return args.out or str(folder / "bench.json"), args.md or str(folder / "bench.md")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip()]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        build_parser().error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.repeats is not None and args.repeats < 1:
        build_parser().error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        build_parser().error(f"--threads must be >= 1, got {args.threads}")
    refusal = readme_refusal(args)
    args.out, args.md = output_paths(args)
    if refusal is None:  # the markers are checked now, not after minutes of measuring
        try:
            readme_with_table(Path(args.readme).read_text(encoding="utf-8"), "", args.readme)
        except (OSError, ValueError) as e:
            build_parser().error(f"--readme: {e}")
    # Tiny models gain nothing from more threads, and on a busy machine OpenMP's spinning threads made
    # the quick run about 10x slower (a minute, not seconds): --quick uses one unless told otherwise.
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    tuned = keep_freed_memory()  # as `microlm` does: each contender's steps reuse memory instead of page-faulting
    settings = QUICK if args.quick else FULL
    settings = dataclasses.replace(settings, repeats=args.repeats or settings.repeats,
                                   compile=settings.compile and not args.no_compile)

    res = {"machine": machine() | {"keep_freed_memory": tuned},
           "settings": {"quick": args.quick, **dataclasses.asdict(settings)}}
    m = res["machine"]
    print(f"bench   {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, threads: {m['torch_threads']}, "
          f"load average {m['load_average_1m']:.2f}{'; --quick: tiny sizes' if args.quick else ''}", flush=True)

    # The corpus and its tokenizer come first: every model is sized by the vocabulary pretraining would get.
    stories = story_corpus(settings.n_stories)
    bpe = story_bpe(stories)
    tokenizer = Tokenizer.from_bpe(bpe)
    config = GPTConfig(vocab_size=tokenizer.n_vocab, eot_id=tokenizer.eot_id, **settings.model)
    jobs = {
        "tokenizer": lambda: bench_tokenizer(stories, bpe, settings.repeats, settings.encode_chars),
        "training": lambda: bench_training(config, settings.sizes, settings.batch_size, settings.repeats,
                                           compile_size="default" if settings.compile else None),
        "generation": lambda: bench_generation(config, settings.gen_lengths, settings.repeats, settings.gen_batch),
        "lora": lambda: bench_lora(config, settings.batch_size, settings.repeats, settings.latency_tokens),
        "memory": lambda: bench_memory(args.runs_dir),
    }
    failed, res["section_seconds"] = [], {}
    for name in SECTIONS:
        if name not in sections:
            continue
        print(name, flush=True)
        t = time.perf_counter()
        try:
            res[name] = jobs[name]()
        except Exception as e:  # one broken section must not lose the others' minutes of measuring
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        res["section_seconds"][name] = time.perf_counter() - t
    res["machine"]["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    save_json(args.out, res)
    table = to_markdown(res)
    save_text(args.md, table)
    print("\n" + table)
    print(f"wrote {args.out} and {args.md}")
    if failed:
        error = f"section(s) {', '.join(failed)} failed (traceback above)"
    elif "tokenizer" in res and not res["tokenizer"]["identical_ids"]:
        error = "tiktoken and encode_python gave different ids for the same text: a tokenizer bug"
    else:
        error = None
    if error:
        print(f"error: {error}; {args.readme} left alone", file=sys.stderr)
        return 1
    if refusal is None:
        readme = Path(args.readme)
        save_text(readme, readme_with_table(readme.read_text(encoding="utf-8"), table, args.readme))
        print(f"wrote the table into {args.readme}")
    else:
        print(f"left {args.readme} alone: {refusal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
