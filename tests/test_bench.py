"""`make bench` keeps working: benchmarks/run.py --quick, as the Makefile runs it, writes every section.

The numbers of a quick run mean nothing (tiny sizes, a busy machine), so only their sanity is checked:
every timing positive and ordered (min <= median <= max) with its rounds kept, every ratio taken round
by round and ordered, and tiktoken's ids identical to the plain-Python encoder's. Benchmarks never fail
on a number; a crash or wrong ids do fail here.
"""

import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"  # a copy: were the guard broken, a quick run would overwrite the real table
    shutil.copy(ROOT / "README.md", readme)
    # A subprocess, as `make bench ARGS=--quick` runs it (--quick uses one torch thread).
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                           "--out", str(out / "bench.json"), "--md", str(out / "bench.md"),
                           "--runs-dir", str(out / "no-runs"), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert readme.read_bytes() == (ROOT / "README.md").read_bytes()
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), proc.stdout


def timings(obj):
    """Every {median_s, min_s, max_s} anywhere in the results."""
    if isinstance(obj, dict):
        if "median_s" in obj:
            yield obj
        for v in obj.values():
            yield from timings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from timings(v)


def ratios(obj):
    """Every paired ratio {median, min, max} anywhere in the results."""
    if isinstance(obj, dict):
        if set(obj) == {"median", "min", "max"}:
            yield obj
        for v in obj.values():
            yield from ratios(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from ratios(v)


def test_a_paired_ratio_is_taken_round_by_round():
    from microlm.evaluate import paired_ratio, timing_stats
    # a slow moment in the third round hits both contenders: round by round, a is half of b every time,
    # while the ratio of the medians (5 / 3) says a is the slower one
    a, b = timing_stats([1.0, 5.0, 5.0]), timing_stats([2.0, 10.0, 3.0])
    assert a["median_s"] / b["median_s"] == pytest.approx(5 / 3)
    assert paired_ratio(a, b) == pytest.approx({"median": 0.5, "min": 0.5, "max": 5 / 3})
    assert a["samples_s"] == [1.0, 5.0, 5.0] and a["n"] == 3
    with pytest.raises(ValueError):  # rounds that do not pair up are a bug, not a ratio
        paired_ratio(a, timing_stats([1.0, 2.0]))
    # timings from files written before the rounds were kept: the ratio of the medians, no spread
    old = {k: v for k, v in a.items() if k != "samples_s"}
    assert paired_ratio(old, b) == {"median": pytest.approx(5 / 3), "min": None, "max": None}


def test_quick_run_writes_every_section_and_the_machine(bench):
    res, _, _ = bench
    assert {"machine", "settings", "tokenizer", "training", "generation", "lora", "memory"} <= set(res)
    assert res["settings"]["quick"] is True
    assert {"cpu", "cpu_count", "torch_threads", "torch", "python"} <= set(res["machine"])
    assert res["machine"]["torch_threads"] == 1


def test_every_timing_is_positive_and_ordered(bench):
    found = list(timings(bench[0]))
    assert len(found) > 20
    for t in found:
        assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"] < math.inf, t
        assert len(t["samples_s"]) == t["n"] and min(t["samples_s"]) == t["min_s"], t


def test_every_ratio_is_paired_and_ordered(bench):
    found = list(ratios(bench[0]))
    assert len(found) >= 15  # training 4 per size + compile-less, generation 4, LoRA 4, tokenizer 4
    for r in found:
        assert 0 < r["min"] <= r["median"] <= r["max"] < math.inf, r


def test_tokenizer_ids_are_identical_and_tiktoken_is_measured(bench):
    tok = bench[0]["tokenizer"]
    assert tok["identical_ids"] is True
    assert tok["encode_tokens"] > 0 and tok["vocab"]["n_vocab"] > 256
    assert all(v > 0 for v in tok["encode_mb_per_s"].values())
    assert tok["ratio_tiktoken_python"]["median"] > 0
    assert set(tok["ratio_to_python"]) == {"tiktoken", "per_story", "threads"}


def test_training_has_three_sizes_with_tokens_per_s_and_mfu(bench):
    tr = bench[0]["training"]
    assert [s["name"] for s in tr["sizes"]] == ["small", "default", "large"]
    assert tr["matmul_peak_flops"] > 0
    for s in tr["sizes"]:
        assert set(s["tokens_per_s"]) == {"ours", "ours_causal", "baseline"}
        assert all(v > 0 for v in s["tokens_per_s"].values())
        # a fraction of a peak measured in the same process; on a busy machine the peak can be measured
        # low, so no upper bound here (timings are for benchmarks, not tests)
        assert s["mfu"]["ours"] > 0 and s["mfu"]["baseline"] > 0
        assert s["ratio_ours_baseline"]["median"] > 0
    assert set(tr["targets"]) == {"mfu_default", "ours_vs_baseline_default"}
    # the default size only is profiled: every part of both models' steps, each a share of a positive total
    assert [("profile" in s) for s in tr["sizes"]] == [False, True, False]
    prof = tr["sizes"][1]["profile"]
    assert set(prof) == {"ours", "baseline"}
    for parts in prof.values():
        assert list(parts) == ["matmul", "attention", "optimizer", "other"]
        assert all(v >= 0 for v in parts.values()) and parts["matmul"] > 0 and parts["optimizer"] > 0
    assert tr["compile"]["ok"] is None  # --quick does not compile


def test_generation_caps_lengths_by_the_context(bench):
    gen = bench[0]["generation"]
    ctx = gen["context_length"]
    assert [g["new_tokens"] for g in gen["lengths"]] == [8, 16, ctx - 1]  # 64 capped: the prompt takes one
    assert gen["lengths"][-1]["requested"] == [64]
    assert all(g["speedup"]["median"] > 0 for g in gen["lengths"])
    assert gen["batched"]["new_tokens"] == ctx - 1 and gen["batched"]["batch_size"] == 4
    assert set(gen["targets"]) == {"kv_cache_speedup_longest", "kv_cache_speedup_longest_batched"}
    assert gen["decoding"] == {"temperature": 1.0, "seed": 0}
    assert all("first_end_token_step" in g for g in gen["lengths"] + [gen["batched"], gen["token_profile"]])
    tp = gen["token_profile"]  # a cached token taken apart: its operator calls and where its time goes
    assert tp["tokens"] == ctx - 1 and 0 < tp["python_calls_per_token"] < tp["calls_per_token"]
    assert tp["seconds_per_token"]["matmul"] > 0 and tp["seconds_per_token"]["attention"] > 0
    assert tp["seconds_per_token"]["optimizer"] == 0  # nothing trains while decoding
    assert tp["matmul_peak_flops"] > 0
    # timed without the profiler: a sanity check only, since the profiler slows the operators it times
    assert 0.5 * sum(tp["seconds_per_token"].values()) < tp["timed_seconds_per_token"] < 1.0
    # 2 FLOPs per matmul weight: a third of the training count's 6 N, its attention term set aside
    from microlm.model import GPT, GPTConfig
    c = GPTConfig(vocab_size=bench[0]["tokenizer"]["vocab"]["n_vocab"], **bench[0]["settings"]["model"])
    attention = 12 * c.n_layers * c.d_model * c.context_length
    assert tp["matmul_flops_per_token"] == (GPT(c).flops_per_token() - attention) / 3


def test_lora_compares_step_memory_and_latency(bench):
    lo = bench[0]["lora"]
    assert lo["trainable_params"]["lora"] < lo["trainable_params"]["full"]
    assert lo["memory_ratio_lora_full"] < 1  # tensors are counted, not timed: this holds even when quick
    assert lo["peak_memory_ratio_lora_full"] < 1  # and recorded as they are allocated
    for name, peak in lo["train_memory_measured_bytes"].items():
        counted = lo["train_memory_bytes"][name]
        # every saved activation exists at once when the forward pass ends, beside the weights and moments
        assert peak["peak"] >= counted["total"] - counted["gradients"]
    assert "| LoRA vs full: peak tensor memory of a step, measured" in bench[1]
    assert set(lo["latency_ratio_to_base"]) == {"merged", "merged_in_place", "unmerged"}
    assert set(lo["targets"]) == {"lora_step_vs_full", "lora_memory_vs_full", "merged_latency_vs_base"}
    # the floor beside them: two trainable vectors, the first block's query and key norm gains
    from microlm.model import GPTConfig
    assert set(lo["train_step"]) == {"lora", "full", "frozen"}
    assert lo["trainable_params"]["frozen"] == 2 * GPTConfig(**bench[0]["settings"]["model"]).head_dim
    assert "| LoRA's floor: a step with every weight frozen but" in bench[1]
    assert lo["latency_decoding"] == {"temperature": 1.0, "seed": 0}


@pytest.mark.parametrize("qk_norm", [True, False])
def test_the_lora_floor_runs_the_backward_down_to_the_first_block(qk_norm):
    import torch
    from microlm.model import GPT, GPTConfig
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=32, context_length=16, d_model=16, n_layers=3, n_heads=2, qk_norm=qk_norm))
    with torch.no_grad():  # gains away from 1, so that every path matters
        for p in base.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    floor = from_benchmarks("bench_lora").lora_floor(base)
    names = ["blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"] if qk_norm else ["blocks.0.attn_norm.weight"]
    assert [n for n, p in floor.named_parameters() if p.requires_grad] == names
    assert all(p.requires_grad for p in base.parameters())  # a copy: the base is left as it was
    x = torch.randint(0, 32, (2, 16))
    for model in (floor, base):
        model(x).square().mean().backward()
    # the same gradient as with every weight trainable: no path through any block is cut
    grads = dict(base.named_parameters())
    for name, p in floor.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7)
            assert p.grad.abs().sum() > 0


def test_a_steps_memory_is_measured_on_top_of_what_exists_between_steps():
    import dataclasses
    import torch
    from microlm.finetune import LoRAConfig, finetune_defaults, prepare_model, training_memory
    from microlm.model import GPT, GPTConfig
    bench_lora = from_benchmarks("bench_lora")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, context_length=32, d_model=32, n_layers=2, n_heads=2)
    x, y = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    cfg = dataclasses.replace(finetune_defaults(full=False), batch_size=4)
    for model in (prepare_model(GPT(config), LoRAConfig()), GPT(config)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        measured = bench_lora.measured_step_memory(model, (x, y), cfg)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy trained
        trainable = [p for p in model.parameters() if p.requires_grad]
        weights = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
        adamw = sum(2 * p.numel() * 4 + 4 for p in trainable)  # two moments and a float32 step count each
        assert measured["resident"] == weights + adamw + 2 * x.numel() * 8
        counted = training_memory(model, (x, y), cfg)
        assert counted["activations"] <= measured["step_peak"] <= 2 * counted["total"]
        assert measured["peak"] == measured["resident"] + measured["step_peak"]
        assert bench_lora.measured_step_memory(model, (x, y), cfg) == measured  # the same allocations
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True):
            leftover = torch.ones(1000, 1000)  # allocated while profiling, freed after: not the next step's
        del leftover
        assert bench_lora.measured_step_memory(model, (x, y), cfg) == measured


def test_decoding_is_timed_on_sampled_tokens_the_same_every_call():
    # Greedy decoding of a random model can repeat one token (the end token, for the default model),
    # which no story does; a seeded sample at temperature 1.0 varies and is drawn alike every call.
    import torch
    from microlm.generate import generate
    from microlm.model import GPT, GPTConfig
    bench_generation = from_benchmarks("bench_generation")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_length=64, d_model=16, n_layers=1, n_heads=2, eot_id=63)).eval()
    prompt = torch.tensor([[63]])
    first = generate(model, prompt, 40, **bench_generation.sampling())
    assert generate(model, prompt, 40, **bench_generation.sampling()) == first
    assert len(set(first[0])) > 10
    first_end = bench_generation.first_end_token_step
    assert first_end([[1, 2, 3], [4, 63, 63], [63, 5]], 63) == 0 and first_end([[1, 2]], 63) is None


def test_results_from_before_sampling_and_the_floor_still_render(bench):
    # report.py also re-renders older results/bench.json files: those decoded greedily, had no floor
    import copy
    report = from_benchmarks("report")
    old = copy.deepcopy(bench[0])
    del old["generation"]["decoding"], old["generation"]["batched"]["first_end_token_step"]
    del old["lora"]["train_step"]["frozen"]
    del old["lora"]["train_memory_measured_bytes"], old["lora"]["peak_memory_ratio_lora_full"]
    gen, lora = report.generation_rows(old["generation"]), report.lora_rows(old["lora"])
    assert "(greedy, batch 1)" in gen[0][0] and "sampled" not in " ".join(r[0] for r in gen)
    assert not any("floor" in r[0] or "measured" in r[0] for r in lora)
    counted = [r for r in lora if "tensor memory of a step, counted (" in r[0]]
    assert len(counted) == 1 and counted[0][3].endswith("met")  # its target was set on the count then
    new = report.generation_rows(bench[0]["generation"])
    assert "(sampled at T = 1.0, batch 1)" in new[0][0]


def test_memory_says_what_to_run_when_no_run_measured_it(bench):
    mem = bench[0]["memory"]
    assert mem["pretrain"] == {"peak_rss_mib": None, "note": "not measured: run make pretrain first"}
    assert mem["lora_finetune"]["peak_rss_mib"] is None
    assert mem["this_benchmark"]["peak_rss_mib"] > 0


def test_markdown_table_marks_targets_and_is_printed(bench):
    _, md, stdout = bench
    assert "| benchmark | measured: median (min-max) | ratio | target |" in md
    assert md.count(": met") + md.count(": NOT met") == 9  # every target of the issue, marked
    assert md.count("where a step's time goes") == 1 and md.count("where a cached token's time goes") == 1
    assert md in stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_bench_runs_this_script_with_args():
    # A dry run (-n): it prints the command without running it, and never installs anything.
    proc = subprocess.run(["make", "-n", "bench", "ARGS=--quick"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "benchmarks/run.py --quick" in proc.stdout


def from_benchmarks(module: str):
    """Import a module of benchmarks/ (a folder of scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_peak_rss_is_read_from_a_run_summary(tmp_path):
    bench_memory = from_benchmarks("bench_memory").bench_memory
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "summary.json").write_text(json.dumps({"peak_rss_mib": 812.5}))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "summary.json").write_text(json.dumps({"accuracy": 0.2}))  # an older run: no key
    mem = bench_memory(tmp_path)
    assert mem["pretrain"]["peak_rss_mib"] == 812.5
    assert mem["lora_finetune"]["peak_rss_mib"] is None and "no peak_rss_mib" in mem["lora_finetune"]["note"]


def test_readme_table_is_results_bench_md():
    # make bench writes both from one run; a hand edit of either, or a copy of another run, fails here
    report = from_benchmarks("report")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert report.table_in_readme(readme) == (ROOT / "results" / "bench.md").read_text(encoding="utf-8")


def test_readme_table_is_replaced_between_the_markers_only():
    report = from_benchmarks("report")
    start, end = report.README_START, report.README_END
    readme = f"# title\n\ntext before\n{start}\nold table\n{end}\n\ntext after\n"
    new = report.readme_with_table(readme, "| new | table |\n")
    assert new == f"# title\n\ntext before\n{start}\n| new | table |\n\n{end}\n\ntext after\n"
    assert report.table_in_readme(new) == "| new | table |\n"
    assert report.readme_with_table(new, "| new | table |\n") == new  # rewriting the same table changes nothing


@pytest.mark.parametrize("readme", ["no markers", "{end}\nx\n{start}\n", "{start}\nx\n{end}\n{start}\ny\n{end}\n",
                                    "{start}\nno end\n"])
def test_readme_without_one_pair_of_markers_is_refused_by_name(readme):
    report = from_benchmarks("report")
    readme = readme.format(start=report.README_START, end=report.README_END)
    with pytest.raises(ValueError, match="docs/R.md: the benchmark table must sit between"):
        report.readme_with_table(readme, "| t |\n", "docs/R.md")


def test_quick_run_leaves_the_readme_alone(bench):
    # the fixture checked the bytes; the run also says so
    assert "README.md alone: --quick: only a full run of every section goes there" in bench[2]


@pytest.mark.parametrize("flags, refusal", [
    ([], None),
    (["--repeats", "3", "--threads", "1"], None),  # the table states both
    (["--quick"], "--quick: only a full run"),
    (["--only", "tokenizer,training,generation,lora,memory"], "--only: only a full run"),
    (["--no-compile"], "--no-compile: only a full run"),
    (["--no-readme"], "as --no-readme asks"),
])
def test_only_a_full_run_may_write_the_readme(flags, refusal):
    run = from_benchmarks("run")
    got = run.readme_refusal(run.build_parser().parse_args(flags))
    assert got is None if refusal is None else got.startswith(refusal), got
    # results/ holds the README's table and its JSON: a run that leaves the README alone writes elsewhere
    out, md = run.output_paths(run.build_parser().parse_args(flags))
    folder = ROOT / ("results" if refusal is None else "runs/bench")
    assert (Path(out), Path(md)) == (folder / "bench.json", folder / "bench.md")
    given = run.build_parser().parse_args([*flags, "--out", "a.json", "--md", "a.md"])
    assert run.output_paths(given) == ("a.json", "a.md")


def test_full_run_with_a_readme_lacking_markers_stops_before_measuring(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--readme", str(readme),
                           "--out", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--readme: " in proc.stderr and "README.md: the benchmark table" in proc.stderr
    assert not (tmp_path / "b.json").exists() and readme.read_text() == "# no markers here\n"


def test_step_profile_puts_each_op_in_its_part():
    bench_training = from_benchmarks("bench_training")
    from microlm.model import GPT, GPTConfig
    from microlm.train import TrainConfig

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2)
    # a model without attention: only its linear layer's matmuls, the optimizer and element-wise ops
    no_attention = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64))
    batch = bench_training.random_batch(64, 2, 16)
    prof = bench_training.step_profile({"gpt": GPT(config), "no_attention": no_attention}, batch, TrainConfig(), 1)
    assert prof["gpt"]["attention"] > 0 and prof["no_attention"]["attention"] == 0
    for parts in prof.values():
        assert parts["matmul"] > 0 and parts["optimizer"] > 0 and parts["other"] > 0


def test_a_ratio_shows_its_spread_or_none_for_older_results():
    report = from_benchmarks("report")
    assert report._ratio({"median": 0.8, "min": 0.75, "max": 0.9}) == "0.80x (0.75-0.90)"
    assert report._ratio({"median": 1.5, "min": None, "max": None}, ".1f") == "1.5x"  # no rounds kept
