"""bench.json as a markdown table: every figure as median (min-max) beside its ratio and its target;
a ratio as the median of the rounds' ratios, (min-max) of them beside it."""

from __future__ import annotations

from microlm.evaluate import format_ratio as _ratio  # a paired ratio: median, (min-max) of the rounds


def _mark(t: dict | None) -> str:
    if not t:
        return ""
    return f"{t['target']}: {'met' if t['met'] else 'NOT met'}"


def _rate(amount: float, timing: dict, unit: str, fmt: str = ",.0f") -> str:
    """amount per second from a timing, median with the spread: the slowest repeat gives the lowest rate."""
    return (f"{amount / timing['median_s']:{fmt}} {unit} "
            f"({amount / timing['max_s']:{fmt}}-{amount / timing['min_s']:{fmt}})")


def _ms(timing: dict, per: float = 1.0) -> str:
    return (f"{1e3 * timing['median_s'] / per:.2f} ms ({1e3 * timing['min_s'] / per:.2f}-"
            f"{1e3 * timing['max_s'] / per:.2f})")


def training_rows(tr: dict) -> list[tuple]:
    rows = []
    peak = tr["matmul_peak_flops"] / 1e9
    for s in tr["sizes"]:
        c, step, tok = s["config"], s["step"], s["tokens_per_step"]
        is_default = s["name"] == "default"
        shape = (f"d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads, context "
                 f"{c['context_length']}, batch {c['batch_size']}, vocab {c['vocab_size']}")
        rows.append((f"training, {s['name']} ({shape}): tokens/s, ours vs GPT-2-style baseline",
                     f"ours {_rate(tok, step['ours'], 'tok/s')}; baseline {_rate(tok, step['baseline'], 'tok/s')}",
                     _ratio(s["ratio_ours_baseline"]),
                     _mark(tr["targets"].get("ours_vs_baseline_default")) if is_default else ""))
        rows.append((f"training, {s['name']}: ours without the document mask (causal only)",
                     f"{_rate(tok, step['ours_causal'], 'tok/s')}",
                     f"{_ratio(s['ratio_ours_causal_baseline'])} baseline; the mask costs "
                     f"{_ratio(s['document_mask_cost'])}",
                     ""))
        rows.append((f"training, {s['name']}: model FLOP utilisation",
                     # two decimals: 54.97% must not print as the 55.0% it falls short of
                     f"ours {s['mfu']['ours']:.2%}, baseline {s['mfu']['baseline']:.2%} of {peak:.0f} GFLOP/s "
                     "(fp32 matmul peak, this process)", "",
                     _mark(tr["targets"].get("mfu_default")) if is_default else ""))
        if "profile" in s:
            rows.append(_profile_row(s["name"], s["profile"]))
    comp = tr["compile"]
    if comp.get("ok"):
        size = next(s for s in tr["sizes"] if "compile" in s)
        tok, step, even = size["tokens_per_step"], size["step"], comp["break_even_steps"]
        rows.append((f"torch.compile, {size['name']}: compiled vs eager",
                     f"{_rate(tok, step['ours_compiled'], 'tok/s')} vs {_rate(tok, step['ours'], 'tok/s')}; "
                     f"compiling took {comp['compile_s']:.0f} s", _ratio(comp["speedup"]),
                     ("pays" if comp["pays"] else "does not pay") + f" over a default run ({comp['run_steps']:,} steps)"
                     + (f"; break-even after {even:,.0f} steps" if even else "")))
    else:
        rows.append(("torch.compile", comp.get("skipped") or f"failed: {comp.get('error')}", "", ""))
    return rows


PART_NAMES = {"matmul": "matmuls", "attention": "attention", "optimizer": "optimizer", "other": "the rest"}


def _profile_row(size: str, prof: dict) -> tuple:
    """Where a step's time goes (bench_training.step_profile): ms per part and share, ours and baseline;
    as the ratio, ours / baseline part by part."""
    def parts(p: dict) -> str:
        total = sum(p.values())
        return f"{1e3 * total:.0f} ms: " + ", ".join(f"{PART_NAMES[k]} {1e3 * v:.0f} ({v / total:.0%})"
                                                     for k, v in p.items())
    ours, base = prof["ours"], prof["baseline"]
    return (f"training, {size}: where a step's time goes (torch.profiler, self CPU time; the rest: element-wise "
            "ops, norms, the loss, copies, autograd's bookkeeping)", f"ours {parts(ours)}; baseline {parts(base)}",
            "ours / baseline time: " + ", ".join(f"{PART_NAMES[k]} {ours[k] / base[k]:.2f}x"
                                                 for k in ours if base[k] > 0), "")


def _decoding(gen: dict) -> str:
    """How the generation benchmark drew the tokens it decoded; results from before it recorded that
    decoded greedily."""
    d = gen.get("decoding")
    return f"sampled at T = {d['temperature']}" if d else "greedy"


def generation_rows(gen: dict) -> list[tuple]:
    rows = []
    longest = gen["lengths"][-1]["new_tokens"]
    for g in gen["lengths"]:
        n = g["new_tokens"]
        capped = [r for r in g["requested"] if r != n]
        label = f"generation, {n} new tokens" + (f" ({', '.join(map(str, capped))} capped by the context "
                                                   f"{gen['context_length']})" if capped else "")
        rows.append((label + f": KV cache vs recomputing the prefix ({_decoding(gen)}, batch 1)",
                     f"{_rate(n, g['time']['kv_cache'], 'tok/s')} vs {_rate(n, g['time']['recompute'], 'tok/s')}",
                     _ratio(g["speedup"], ".1f"),
                     _mark(gen["targets"]["kv_cache_speedup_longest"]) if n == longest else ""))
    b = gen["batched"]
    tokens = b["new_tokens"] * b["batch_size"]
    first_end = b.get("first_end_token_step")
    rows.append((f"generation, {b['new_tokens']} new tokens, batch {b['batch_size']}: KV cache vs recomputing "
                 f"({_decoding(gen)}, {b['time']['recompute']['n']} repeats"
                 + (f"; a row drew the end token at step {first_end}: the document mask from then on" if
                    first_end is not None else "") + ")",
                 f"{_rate(tokens, b['time']['kv_cache'], 'tok/s')} vs {_rate(tokens, b['time']['recompute'], 'tok/s')}",
                 _ratio(b["speedup"], ".1f"), _mark(gen["targets"]["kv_cache_speedup_longest_batched"])))
    rows.append(_token_profile_row(gen["token_profile"]))
    return rows


def _token_profile_row(tp: dict) -> tuple:
    """Where a cached token's time goes (bench_generation.token_profile), against its arithmetic."""
    parts = {k: v for k, v in tp["seconds_per_token"].items() if v > 0}
    total, timed = sum(parts.values()), tp["timed_seconds_per_token"]
    arithmetic = tp["matmul_flops_per_token"] / tp["matmul_peak_flops"]
    return (f"generation: where a cached token's time goes (batch 1, {tp['tokens']} tokens; timed, then under "
            "torch.profiler: the operators' self CPU time)",
            f"{1e3 * timed:.2f} ms a token timed; under the profiler its operators take {1e3 * total:.2f} ms: "
            f"{tp['python_calls_per_token']:.0f} calls from Python, {tp['calls_per_token']:,.0f} in all; "
            + ", ".join(f"{PART_NAMES[k]} {1e3 * v:.2f} ms ({v / total:.0%})" for k, v in parts.items())
            + f". The profiler slows the operators, so at least {1e3 * max(0.0, timed - total):.2f} ms of the timed "
              f"token is Python between the calls. Its matmuls' "
              f"{tp['matmul_flops_per_token'] / 1e6:.1f} MFLOP would take {1e6 * arithmetic:.0f} us at the matmul "
              f"peak ({tp['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)",
            f"{timed / arithmetic:,.0f}x its arithmetic", "")


def lora_rows(lo: dict) -> list[tuple]:
    step, lat = lo["train_step"], lo["latency_per_token"]
    ratio, n = lo["latency_ratio_to_base"], lo["latency_tokens"]
    r, targets = lo["lora"]["r"], lo["targets"]
    return [
        (f"LoRA r={r} ({', '.join(lo['lora']['targets'])}) vs full fine-tuning: step time, batch "
         f"{lo['batch'][0]} x {lo['batch'][1]}", f"{_ms(step['lora'])} vs {_ms(step['full'])}",
         _ratio(lo["step_ratio_lora_full"]), _mark(targets["lora_step_vs_full"])),
        *([("LoRA's floor: a step with every weight frozen but the first block's query and key norm gains "
            "(no adapters, no weight gradients of matrices; the backward still runs through every layer, as "
            "LoRA's must)",
            f"{_ms(step['frozen'])}", f"{_ratio(lo['step_ratio_frozen_full'])} full; LoRA "
            f"{_ratio(lo['step_ratio_lora_frozen'])} of it", "")] if "frozen" in step else []),
        *_memory_rows(lo),
        (f"per-token latency ({n} tokens, batch 1): merged (merge_and_unload) vs base",
         f"{_ms(lat['merged'])} vs {_ms(lat['base'])}", _ratio(ratio["merged"], ".3f"),
         _mark(targets["merged_latency_vs_base"])),
        ("per-token latency: merged in place (LoRALinear kept) vs base", f"{_ms(lat['merged_in_place'])}",
         _ratio(ratio["merged_in_place"], ".3f"), ""),
        ("per-token latency: unmerged vs base (the adapter's overhead)", f"{_ms(lat['unmerged'])}",
         _ratio(ratio["unmerged"], ".3f"), ""),
    ]


def _memory_rows(lo: dict) -> list[tuple]:
    """The measured peak (the target's figure) and the count that says where the memory goes; files
    from before the peak was measured have only the count, and their target was set on it."""
    mem, mark = lo["train_memory_bytes"], _mark(lo["targets"]["lora_memory_vs_full"])

    def mib(n: int) -> str:
        return f"{n / 2**20:.1f}"

    counted = ("LoRA vs full: tensor memory of a step, counted (weights, saved activations, gradients, AdamW state)",
               f"{mib(mem['lora']['total'])} vs {mib(mem['full']['total'])} MiB",
               f"{lo['memory_ratio_lora_full']:.2f}x")
    if "train_memory_measured_bytes" not in lo:
        return [(*counted, mark)]
    peak = lo["train_memory_measured_bytes"]
    parts = ", ".join(f"{what} {mib(mem['lora'][key])} vs {mib(mem['full'][key])}" for what, key in
                      (("activations", "activations"), ("gradients", "gradients"), ("AdamW", "optimizer_state")))
    return [("LoRA vs full: peak tensor memory of a step, measured (torch.profiler's allocation records: "
             "weights, AdamW state and batch, plus the most the step had allocated at once)",
             f"{mib(peak['lora']['peak'])} vs {mib(peak['full']['peak'])} MiB (the step's own: "
             f"{mib(peak['lora']['step_peak'])} vs {mib(peak['full']['step_peak'])})",
             f"{lo['peak_memory_ratio_lora_full']:.2f}x", mark),
            (counted[0].replace("counted (", "counted, where it goes ("), f"{counted[1]}: {parts}", counted[2], "")]


def tokenizer_rows(tk: dict) -> list[tuple]:
    enc, v = tk["encode"], tk["vocab"]
    return [
        (f"BPE training, {tk['n_stories']:,} stories ({tk['train_chars'] / 1e6:.1f} MB)",
         f"{_ms(tk['train_bpe'])}; {v['merges']} merges, {v['n_vocab']} tokens"
         + (f" (stopped early: {v['requested']} requested)" if v["stopped_early"] else ""), "", ""),
        (f"encoding {tk['encode_mb']:.2f} MB: tiktoken vs plain Python (encode_python), one thread each",
         f"{_rate(tk['encode_mb'], enc['tiktoken'], 'MB/s', ',.2f')} vs "
         f"{_rate(tk['encode_mb'], enc['python'], 'MB/s', ',.2f')}; ids identical: "
         f"{'yes' if tk['identical_ids'] else 'NO'}",
         _ratio(tk["ratio_tiktoken_python"], ".1f"), _mark(tk["targets"]["tiktoken_vs_python"])),
        (f"encoding {tk['prose']['mb']:.2f} MB of README prose ({tk['prose']['chars_per_token']:.1f} chars/token): "
         "tiktoken vs plain Python",
         f"{_rate(tk['prose']['mb'], tk['prose']['encode']['tiktoken'], 'MB/s', ',.2f')} vs "
         f"{_rate(tk['prose']['mb'], tk['prose']['encode']['python'], 'MB/s', ',.2f')}",
         _ratio(tk["prose"]["ratio_tiktoken_python"], ".1f"), _mark(tk["targets"]["tiktoken_vs_python_prose"])),
        ("encoding: Tokenizer.encode_batch, one tiktoken call per story (how the corpus is encoded)",
         _rate(tk["encode_mb"], enc["per_story"], "MB/s", ",.2f"),
         _ratio(tk["ratio_to_python"]["per_story"], ".1f", "x python"), ""),
        ("encoding: tiktoken's encode_ordinary_batch, one call per story on a pool of threads",
         _rate(tk["encode_mb"], enc["threads"], "MB/s", ",.2f"),
         _ratio(tk["ratio_to_python"]["threads"], ".1f", "x python"), ""),
    ]


def memory_rows(mem: dict) -> list[tuple]:
    names = {"pretrain": "make pretrain", "lora_finetune": "make lora-finetune", "this_benchmark": "this benchmark"}
    return [(f"peak RSS, {names[k]}", f"{v['peak_rss_mib']:,.0f} MiB" if v["peak_rss_mib"] is not None else v["note"],
             "", "") for k, v in mem.items()]


SECTIONS = {"tokenizer": tokenizer_rows, "training": training_rows, "generation": generation_rows,
            "lora": lora_rows, "memory": memory_rows}


def to_markdown(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    quick = " QUICK MODE: tiny sizes, the figures mean nothing." if s["quick"] else ""
    lines = [f"Measured on {m['cpu']} ({m['cpu_count']} cores, {m['cpu_capability']}), torch {m['torch']} "
             f"(threads: {m['torch_threads']}), Python {m['python']}; load average {m['load_average_1m']:.2f} at the "
             f"start. Timings are medians of {s['repeats']} repeats ({3 * s['repeats']} for per-token latencies) after "
             "a warm-up, (min-max) beside them; contenders took turns in one process, each round running each "
             "contender once, and a ratio is the median of the rounds' ratios (one per round), (min-max) of those "
             "beside it. The profile rows have no spread: the training profile is the mean of 3 profiled steps, the "
             f"token profile one profiled decoding; memory is counted or recorded, not timed.{quick}",
             "", "| benchmark | measured: median (min-max) | ratio | target |", "|---|---|---|---|"]
    for name, rows_of in SECTIONS.items():
        if name not in res:
            continue
        if "error" in res[name]:
            lines.append(f"| {name} | failed: {res[name]['error']} | | |")
            continue
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows_of(res[name])]
    return "\n".join(lines) + "\n"


# The README's table is results/bench.md itself, between these two lines; `make bench` rewrites it.
README_START = "<!-- bench table: written by `make bench` from results/bench.md; edit the code, not the table -->"
README_END = "<!-- end of bench table -->"


def readme_with_table(readme: str, table: str, where: str = "README.md") -> str:
    """`readme` with the text between README_START and README_END replaced by `table`. Raises
    ValueError, naming `where`, unless each marker is there exactly once, the start before the end."""
    before, *after = readme.split(README_START)
    if len(after) != 1 or README_END in before or after[0].count(README_END) != 1:
        raise ValueError(f"{where}: the benchmark table must sit between one line {README_START!r} and, after "
                         f"it, one line {README_END!r}; put them back, or run with --no-readme")
    tail = after[0].split(README_END, 1)[1]
    body = table.strip("\n")
    # a blank line before the end marker, so no renderer reads the marker as one more table row
    return f"{before}{README_START}\n{body}\n\n{README_END}{tail}"


def table_in_readme(readme: str) -> str:
    """The table readme_with_table put between the markers, for checking it."""
    return readme.split(README_START + "\n", 1)[1].split(README_END, 1)[0].strip("\n") + "\n"
