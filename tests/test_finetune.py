"""The LoRA stage end to end, in a tiny setting: lora-finetune, finetune --full, merge, sample --adapter,
compare; and their errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from microlm.cli import main
from microlm.finetune import load_lora_run
from microlm.lora import base_fingerprint, lora_layers, save_adapter
from microlm.runs import load_run
from microlm.train import read_metrics

PRETRAIN = ["--n-train", "300", "--n-val", "20", "--max-steps", "4", "--eval-every", "2", "--batch-size", "4",
            "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--n-samples", "0", "--no-progress"]
FINETUNE = ["--n-train", "40", "--n-val", "10", "--max-steps", "3", "--eval-every", "2", "--batch-size", "4",
            "--r", "2", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    assert main(["pretrain", "--run-dir", str(root / "base"), "--data-dir", str(root / "data"), *PRETRAIN]) == 0
    common = ["--base", str(root / "base"), "--data-dir", str(root / "data"), *FINETUNE]
    assert main(["lora-finetune", "--run-dir", str(root / "lora"), *common]) == 0
    assert main(["finetune", "--full", "--run-dir", str(root / "full"), *common]) == 0
    return root


def test_lora_finetune_writes_an_adapter_of_a_and_b_only(runs):
    for name in ("config.json", "metrics.jsonl", "answers.jsonl", "loss.png", "summary.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (runs / "lora" / name).is_file(), name
    adapter = json.loads((runs / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["targets"] == sorted(["q_proj", "k_proj", "v_proj", "output_proj"])
    summary = json.loads((runs / "lora" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["trainable_params"] < summary["total_params"]
    assert 0 <= summary["accuracy"] <= 1 and summary["n_val"] == 10


def test_training_moved_every_b_away_from_zero(runs):
    model, _, _, _ = load_lora_run(runs / "lora")
    for name, layer in lora_layers(model).items():
        assert layer.lora_B.weight.abs().max() > 0, name


def test_merge_writes_a_plain_model_with_the_adapters_function(runs):
    assert main(["merge", "--adapter", str(runs / "lora"), "--out", str(runs / "merged")]) == 0
    merged, tok, _ = load_run(runs / "merged")
    assert not lora_layers(merged)
    lora, _, _, _ = load_lora_run(runs / "lora")
    base, _, _ = load_run(runs / "base")
    x = torch.tensor([[tok.eot_id] + tok.encode("Ann is at the park with a red ball.")])
    with torch.no_grad():
        assert torch.allclose(merged(x), lora(x), atol=1e-5)  # fp32 rounding only
        assert not torch.allclose(merged(x), base(x), atol=1e-4)  # and the adapter did change the model


def test_a_merged_model_and_a_full_fine_tune_are_bases_for_another_fine_tune(runs):
    for base in ("merged", "full"):
        if not (runs / base).exists():
            main(["merge", "--adapter", str(runs / "lora"), "--out", str(runs / "merged")])
        assert main(["lora-finetune", "--base", str(runs / base), "--run-dir", str(runs / f"again-{base}"),
                     "--data-dir", str(runs / "data"), *FINETUNE]) == 0
        config = json.loads((runs / f"again-{base}" / "config.json").read_text())
        assert config["base"] == str(runs / base)
        assert config["base_fingerprint"] == base_fingerprint(load_run(runs / base)[0])  # that model, not the first base
        assert config["base_fingerprint"] != base_fingerprint(load_run(runs / "base")[0])


def test_sample_through_an_unmerged_adapter_writes_what_the_merged_model_writes(runs, capsys, tmp_path):
    # Three steps at r = 2 leave the tiny base's greedy text as it was: give the adapter a B that shows.
    lora = tmp_path / "lora"
    shutil.copytree(runs / "lora", lora)
    model, _, _, _ = load_lora_run(lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
    save_adapter(model, lora / "adapter")
    greedy = ["--n", "2", "--prompt", "Ann is at the", "--temperature", "0"]
    assert main(["sample", "--adapter", str(lora), *greedy]) == 0
    unmerged = capsys.readouterr().out
    assert len(unmerged.strip().split("\n")) == 2
    assert main(["merge", "--adapter", str(lora), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["sample", "--run-dir", str(tmp_path / "merged"), *greedy]) == 0
    assert capsys.readouterr().out == unmerged
    assert main(["sample", "--run-dir", str(runs / "base"), *greedy]) == 0
    assert capsys.readouterr().out != unmerged  # the adapter is on: it changed what the base writes


def test_sample_takes_backslash_n_for_a_newline_and_does_not_score_a_question_as_a_story(runs, capsys):
    # The fine-tuning prompts are "STORY\nQ: ...\nA:"; a shell hands sample a backslash and an n.
    question = ["--n", "1", "--temperature", "0", "--prompt", r"Ann is at home.\nQ: Where is Ann?\nA:"]
    assert main(["sample", "--adapter", str(runs / "lora"), *question]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Ann is at home.\nQ: Where is Ann?\nA:")  # real newlines reached the model
    assert "[valid" not in out and "[INVALID]" not in out  # a question is not a story
    assert main(["sample", "--run-dir", str(runs / "base"), "--n", "1", "--prompt", "Ann is at"]) == 0
    assert capsys.readouterr().out.startswith(("[valid", "[INVALID]"))  # a story prompt is still scored


def test_same_seed_gives_bit_identical_adapters_and_full_weights(runs, tmp_path):
    common = ["--base", str(runs / "base"), "--data-dir", str(runs / "data"), *FINETUNE]
    assert main(["lora-finetune", "--run-dir", str(tmp_path / "lora"), *common]) == 0
    assert main(["finetune", "--full", "--run-dir", str(tmp_path / "full"), *common]) == 0
    for name in ("lora/adapter/adapter_model.safetensors", "full/model.safetensors"):
        assert (tmp_path / name).read_bytes() == (runs / name).read_bytes(), name
    timings = ("tokens_per_s", "mfu")  # the only numbers that may differ
    for kind in ("lora", "full"):
        a, b = ([{k: v for k, v in m.items() if k not in timings} for m in read_metrics(r / kind / "metrics.jsonl")]
                for r in (runs, tmp_path))
        assert a == b and len(a) == 3, kind
        assert (tmp_path / kind / "answers.jsonl").read_bytes() == (runs / kind / "answers.jsonl").read_bytes()


def test_every_run_folder_records_what_produced_it(runs):
    if not (runs / "merged").exists():
        assert main(["merge", "--adapter", str(runs / "lora"), "--out", str(runs / "merged")]) == 0
    for name in ("base", "lora", "full", "merged"):
        config = json.loads((runs / name / "config.json").read_text())
        prov = config["provenance"]
        assert {"seed", "git_commit", "argv", "python", "torch", "numpy", "tiktoken", "safetensors"} <= set(prov), name
        assert len(config["tokenizer"]["sha256"]) == 16, name
    for name in ("base", "merged"):  # a model folder: its pretraining data and model settings
        config = json.loads((runs / name / "config.json").read_text())
        assert {"train_sha256", "val_sha256"} <= set(config["data"]) and "d_model" in config["model"]
    base = json.loads((runs / "base" / "config.json").read_text())
    from microlm.tokenizer import Tokenizer  # stories: a document starts at each end token
    assert base["model"]["eot_id"] == Tokenizer.load(runs / "base" / "tokenizer.json").eot_id >= 0
    for name in ("lora", "full"):  # a fine-tune: its base, its questions and its settings
        config = json.loads((runs / name / "config.json").read_text())
        assert {"train_sha256", "val_sha256"} <= set(config["sft"]) and config["base"] == str(runs / "base")
        assert config["packed_rows"] == base["model"]["context_length"]  # the base masks documents: examples pack
        assert config["train"]["seed"] == config["provenance"]["seed"] and len(config["base_fingerprint"]) == 16
    merged = json.loads((runs / "merged" / "config.json").read_text())
    assert merged["merged_from"]["adapter"] == str(runs / "lora") and merged["merged_from"]["lora"]["r"] == 2


def test_compare_measures_merged_against_unmerged(runs, capsys):
    assert main(["compare", "--lora", str(runs / "lora"), "--full", str(runs / "full"), "--sweep-ranks", "1,2",
                 "--latency-tokens", "4", "--repeats", "1", "--no-progress"]) == 0
    res = json.loads((runs / "lora" / "compare.json").read_text())
    assert set(res["accuracy"]) == {"base", "lora_unmerged", "lora_merged", "merge_and_unload", "full_finetune"}
    assert res["max_abs_logit_diff_fp32"] <= 1e-4
    assert res["max_abs_logit_diff_fp64"] <= 1e-9
    assert [p["r"] for p in res["rank_sweep"]] == [1, 2]
    assert res["trainable_params"]["lora"] < res["trainable_params"]["full"]
    assert res["files"]["adapter_bytes"] < res["files"]["model_bytes"]
    for name in ("param_counts.png", "finetune_loss.png", "rank_sweep.png", "latency.png"):
        assert (runs / "lora" / name).is_file(), name
    assert "greedy answers identical" in capsys.readouterr().out
    # without a sweep, the earlier sweep's plot goes: compare.json no longer holds its figures
    assert main(["compare", "--lora", str(runs / "lora"), "--full", "none", "--sweep-ranks", "",
                 "--latency-tokens", "4", "--repeats", "1", "--no-progress"]) == 0
    assert json.loads((runs / "lora" / "compare.json").read_text())["rank_sweep"] == []
    assert not (runs / "lora" / "rank_sweep.png").exists() and "removed the earlier" in capsys.readouterr().out


# ---- errors ------------------------------------------------------------------------------------


def test_report_reads_lora_and_full_fine_tuning_runs(runs, capsys):
    for kind in ("lora", "full"):
        summary = json.loads((runs / kind / "summary.json").read_text())
        assert main(["report", "--run-dir", str(runs / kind)]) == 0
        out = capsys.readouterr().out
        assert f"| exact match, 10 held-out questions | {summary['accuracy']:.1%} (the base model: " in out
        base = summary["total_params"] - summary["trainable_params"] if kind == "lora" else summary["total_params"]
        assert f"| trainable parameters | {summary['trainable_params']:,} (" in out and f"{base:,})" in out


GOOD_LINE = '{"prompt": "Q: hi\\nA:", "response": " yes"}\n'


@pytest.mark.parametrize("content, message", [(GOOD_LINE + '{"prompt": "no response"}\n', ", line 2"),
                                              (GOOD_LINE, ": 1 example; without --sft-val it needs at least 2")])
def test_a_bad_sft_file_is_named(runs, tmp_path, capsys, content, message):
    data = tmp_path / "my.jsonl"
    data.write_text(content)
    assert main(["lora-finetune", "--base", str(runs / "base"), "--run-dir", str(tmp_path / "r"),
                 "--sft-data", str(data), *FINETUNE]) == 2
    assert f"{data}{message}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing half-made


def test_examples_longer_than_the_context_are_skipped_and_counted(runs, tmp_path, capsys):
    data = tmp_path / "my.jsonl"
    lines = [{"prompt": f"Ann is at the park. Q{i}: Where is Ann?\nA:", "response": " at the park"} for i in range(9)]
    lines.append({"prompt": "Ann goes to the park. " * 200 + "\nA:", "response": " park"})
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["lora-finetune", "--base", str(runs / "base"), "--run-dir", str(tmp_path / "r"),
                 "--sft-data", str(data), *FINETUNE]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 training and 0 held-out examples longer than the context" in out or \
           "skipped 0 training and 1 held-out examples longer than the context" in out


@pytest.mark.parametrize("flags, message", [
    (["--targets", "q_proj,qkv"], "unknown LoRA target(s) ['qkv']; the model's linear layers are"),
    (["--r", "64"], "LoRA rank r must be in [1, 16]"),
    (["--r", "0"], "--r must be >= 1"),
    (["--lr", "-1"], "--lr=-1.0 is out of range (> 0)"),
])
def test_bad_lora_settings_are_refused_with_the_valid_range(runs, tmp_path, capsys, flags, message):
    assert main(["lora-finetune", "--base", str(runs / "base"), "--run-dir", str(tmp_path / "r"),
                 "--data-dir", str(runs / "data"), *FINETUNE, *flags]) == 2
    assert message in capsys.readouterr().err


def test_bad_lora_targets_are_refused_before_overwrite_deletes_the_run(runs, tmp_path, capsys):
    run = tmp_path / "lora"
    shutil.copytree(runs / "lora", run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for flags, message in ((["--targets", "q_proj,lm_head"], "'lm_head' shares its weight with tok_emb.weight"),
                           (["--r", "64"], "LoRA rank r must be in [1, 16]")):
        assert main(["lora-finetune", "--base", str(runs / "base"), "--run-dir", str(run), "--overwrite",
                     "--data-dir", str(runs / "data"), *FINETUNE, *flags]) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_an_adapter_is_refused_on_another_base(runs, capsys):
    assert main(["merge", "--adapter", str(runs / "lora"), "--base", str(runs / "full"),
                 "--out", str(runs / "wrong")]) == 2
    assert "trained on another base model" in capsys.readouterr().err


def test_merge_never_replaces_its_own_inputs_and_names_its_own_flags(runs, tmp_path, capsys):
    for out in (runs / "lora", runs / "base"):  # --overwrite would have deleted them
        assert main(["merge", "--adapter", str(runs / "lora"), "--out", str(out), "--overwrite"]) == 2
        assert "would replace its own input; choose another --out" in capsys.readouterr().err
    assert (runs / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert (runs / "base" / "model.safetensors").is_file()
    assert main(["merge", "--adapter", str(runs / "lora"), "--out", str(tmp_path / "m")]) == 0
    assert main(["merge", "--adapter", str(runs / "lora"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it, or choose another --out" in err and "--resume" not in err


def test_compare_refuses_sweep_ranks_out_of_range_before_measuring(runs, capsys):
    before = {p: p.stat().st_mtime_ns for p in (runs / "lora").rglob("*")}
    for ranks in ("0", "2,17"):  # d_model 16 bounds the rank
        assert main(["compare", "--lora", str(runs / "lora"), "--full", "none", "--sweep-ranks", ranks,
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "--sweep-ranks" in err and "r must be in [1, 16]" in err
    assert {p: p.stat().st_mtime_ns for p in (runs / "lora").rglob("*")} == before  # nothing written


def test_compare_on_a_folder_that_is_not_a_lora_run_says_so(runs, capsys):
    assert main(["compare", "--lora", str(runs / "full"), "--full", "none"]) == 2
    assert "is not a LoRA run" in capsys.readouterr().err


def test_compare_reads_the_questions_the_run_was_trained_on_even_after_they_were_rewritten(runs, tmp_path, capsys):
    # A fine-tune with other sizes rewrites data/sft_*.jsonl; compare must not judge runs/lora on those.
    from microlm.compare import run_examples
    from microlm.sft import read_sft_jsonl
    run = shutil.copytree(runs / "lora", tmp_path / "lora")
    shutil.copytree(runs / "data", tmp_path / "data")
    config = json.loads((run / "config.json").read_text())
    data = {split: str(tmp_path / "data" / f"sft_{split}.jsonl") for split in ("train", "val")}
    config["sft"] = {**config["sft"], **data}
    _, _, base_config = load_run(runs / "base")
    scratch = tmp_path / "scratch"
    train, heldout, files = run_examples(config, base_config, run, scratch)
    assert len(heldout) == 10 and heldout == read_sft_jsonl(data["val"]) and files == data
    assert "note:" not in capsys.readouterr().out
    lines = Path(data["val"]).read_text().splitlines(keepends=True)
    Path(data["val"]).write_text("".join(lines[:4]))  # another run's, smaller set
    again = run_examples(config, base_config, run, scratch)
    assert again[:2] == (train, heldout) and "missing here or changed since" in capsys.readouterr().out
    # the files it returns (which the rank sweep trains on) hold the same questions
    assert [read_sft_jsonl(again[2][split]) for split in ("train", "val")] == [read_sft_jsonl(files["train"]), heldout]
    config["sft"]["kind"] = "jsonl"  # the user's own file: it cannot be rebuilt
    with pytest.raises(ValueError, match="sft_val.jsonl is not the file the run read"):
        run_examples(config, base_config, run, scratch)
    Path(data["val"]).unlink()
    with pytest.raises(ValueError, match="sft_val.jsonl is missing; .* was trained and evaluated on it"):
        run_examples(config, base_config, run, scratch)


def test_a_lora_run_trained_with_a_relative_base_works_from_any_folder(runs, tmp_path, monkeypatch, capsys):
    # config.json records the base as given (runs/pretrain, read from the working folder) and from the run
    project = tmp_path / "project"
    shutil.copytree(runs / "base", project / "runs" / "base")
    shutil.copytree(runs / "data", project / "data")
    monkeypatch.chdir(project)
    assert main(["lora-finetune", "--base", "runs/base", "--run-dir", "runs/lora", *FINETUNE]) == 0
    assert json.loads((project / "runs" / "lora" / "config.json").read_text())["base_from_run"] == "../base"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)  # a folder of the same name here is not the run's base
    capsys.readouterr()
    for adapter in (project / "runs" / "lora", project / "runs" / "lora" / "adapter"):
        assert main(["sample", "--adapter", str(adapter), "--prompt", "Ann", "--n", "1"]) == 0
    assert main(["merge", "--adapter", str(project / "runs" / "lora"), "--out", str(tmp_path / "merged")]) == 0
    shutil.rmtree(project / "runs" / "base")
    shutil.rmtree(tmp_path / "runs" / "base")
    assert main(["sample", "--adapter", str(project / "runs" / "lora"), "--n", "1"]) == 2
    assert "the base model folder runs/base named by" in capsys.readouterr().err
