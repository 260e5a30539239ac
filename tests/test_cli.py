"""`microlm pretrain` and `microlm sample` end to end, in a tiny setting, and their errors."""

import json

import pytest

from microlm.cli import main
from microlm.train import read_metrics

TINY = ["--n-train", "300", "--n-val", "20", "--max-steps", "4", "--eval-every", "2", "--batch-size", "4",
        "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--n-samples", "4", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["pretrain", "--run-dir", str(root / "run"), "--data-dir", str(root / "data"), *TINY]) == 0
    return root


def test_pretrain_writes_every_output(run):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "samples.txt",
                 "summary.json"):
        assert (run / "run" / name).is_file(), name
    summary = json.loads((run / "run" / "summary.json").read_text())
    assert {"val_bpc", "bound_bpc", "sample_validity", "tokens_per_s", "mfu"} <= set(summary)
    config = json.loads((run / "run" / "config.json").read_text())
    assert {"seed", "git_commit", "torch"} <= set(config["provenance"])


def test_same_seed_writes_byte_identical_corpus_weights_samples_and_metrics(run, tmp_path):
    assert main(["pretrain", "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), *TINY]) == 0
    for name in ("data/train.txt", "data/val.txt", "run/model.safetensors", "run/tokenizer.json", "run/samples.txt"):
        assert (tmp_path / name).read_bytes() == (run / name).read_bytes(), name
    timings = ("tokens_per_s", "mfu")  # the only numbers that may differ
    metrics = [[{k: v for k, v in m.items() if k not in timings} for m in read_metrics(r / "run" / "metrics.jsonl")]
               for r in (run, tmp_path)]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 4


def test_sample_scores_stories(run, capsys):
    assert main(["sample", "--run-dir", str(run / "run"), "--n", "2", "--prompt", "Ann is at the"]) == 0
    out = capsys.readouterr().out.split("\n")[:-1]
    assert len(out) == 2 and all(line.startswith(("[valid", "[INVALID]")) for line in out)
    assert all("Ann is at the" in line for line in out)


def test_a_second_run_into_the_same_folder_is_refused(run, capsys):
    assert main(["pretrain", "--run-dir", str(run / "run"), "--data-dir", str(run / "data"), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"caf\xe9 au lait\n" * 300, "not UTF-8 (byte 3, line 1)"),
    (b"too short", "only 9 characters"),
])
def test_bad_corpus_files_get_a_clear_error(tmp_path, capsys, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    assert main(["pretrain", "--corpus", str(corpus), "--run-dir", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and str(corpus) in err


def test_any_text_file_can_be_the_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["pretrain", "--corpus", str(corpus), "--run-dir", str(tmp_path / "r"), *TINY, "--context-length", "32"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "bound_bpc" not in summary and summary["val_bpc"] > 0


def test_impossible_values_are_refused_with_the_valid_range(tmp_path, capsys):
    assert main(["pretrain", "--run-dir", str(tmp_path / "r"), "--lr", "-1", *TINY]) == 2
    assert "--lr=-1.0 is out of range (> 0)" in capsys.readouterr().err
    assert main(["pretrain", "--run-dir", str(tmp_path / "r"), "--device", "nosuch", *TINY]) == 2
    assert "not available" in capsys.readouterr().err


def test_a_run_of_an_older_story_world_is_refused_with_what_to_do(run, tmp_path, capsys):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(run / "run", old)
    config = json.loads((old / "config.json").read_text())
    config["data"]["world"].update(grammar="0123456789ab", places=["park", "beach"])  # the eight-place world
    (old / "config.json").write_text(json.dumps(config))
    assert main(["sample", "--run-dir", str(old), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert str(old) in err and "another microlm version" in err and "make pretrain ARGS=--overwrite" in err


def test_report_prints_the_run_as_a_table_and_names_a_damaged_summary(run, tmp_path, capsys):
    assert main(["report", "--run-dir", str(run / "run")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "run" / "summary.json").read_text())
    assert out.startswith(f"| {run / 'run'} | |\n|---|---|\n")
    assert f"| model / bound | {summary['bpc_over_bound']:.3f} (target <= 1.15: " in out
    assert f"| valid samples (T = 1.0) | {summary['sample_validity']:.1%} of 4 " in out
    (tmp_path / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "val_ppl"}))
    assert main(["report", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "summary.json" in err and "val_ppl" in err and "damaged" in err
    for key in ("lookups", "accuracy_by_kind"):  # an object replaced by a list
        (tmp_path / "summary.json").write_text(json.dumps({**summary, key: [1]}))
        if key == "accuracy_by_kind":
            (tmp_path / "summary.json").write_text(json.dumps({**summary, "kind": "lora", key: [1]}))
        assert main(["report", "--run-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "summary.json" in err and "damaged" in err


def test_sample_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["sample", "--run-dir", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_ctrl_c_on_a_real_process_then_resume_ends_with_the_same_weights(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    args = ["--data-dir", str(tmp_path / "data"), "--n-train", "300", "--n-val", "20", "--max-steps", "300",
            "--eval-every", "100", "--checkpoint-every", "1000", "--batch-size", "2", "--context-length", "200",
            "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--n-samples", "0", "--no-progress"]
    assert main(["pretrain", "--run-dir", str(tmp_path / "whole"), *args]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "microlm.cli", "pretrain", "--run-dir", str(cut), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    saved = json.loads((cut / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 20 <= saved < 300 and "--resume" in err
    assert main(["pretrain", "--run-dir", str(cut), "--resume", *args]) == 0
    assert (cut / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_ctrl_c_after_training_says_how_to_finish_and_resume_finishes_the_run(run, tmp_path, capsys, monkeypatch):
    import microlm.pretrain
    args = ["--run-dir", str(tmp_path / "r"), "--data-dir", str(run / "data"), *TINY]

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(microlm.pretrain, "finish_pretrain", ctrl_c)  # while sampling and evaluating the trained model
        assert main(["pretrain", *args]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err and "--resume" in err
    assert not (tmp_path / "r" / "summary.json").exists()  # what `make pretrain` takes for a finished run
    assert main(["pretrain", "--resume", *args]) == 0
    assert (tmp_path / "r" / "summary.json").is_file()
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == (run / "run" / "model.safetensors").read_bytes()


def test_stock_gpt2_tokenizer_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert main(["pretrain", "--tokenizer", "gpt2", "--run-dir", str(tmp_path / "r"),
                 "--data-dir", str(tmp_path / "d"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "never downloads" in err and "Traceback" not in err


def test_overwrite_with_bad_input_keeps_the_existing_run(run, tmp_path, capsys):
    before = (run / "run" / "model.safetensors").read_bytes()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["pretrain", "--overwrite", "--corpus", str(empty), "--run-dir", str(run / "run"), *TINY]) == 2
    assert "empty" in capsys.readouterr().err
    assert (run / "run" / "model.safetensors").read_bytes() == before


def test_full_fine_tuning_notes_lora_flags_it_does_not_use(tmp_path, capsys):
    # `make lora-finetune ARGS=...` passes the same flags to `lora-finetune` and `finetune --full`
    assert main(["finetune", "--full", "--r", "16", "--targets", "q_proj", "--base", str(tmp_path / "none")]) != 0
    out = capsys.readouterr().out
    assert "note: --r, --targets set LoRA up; --full trains every weight and does not use them" in out
    main(["finetune", "--full", "--r", "8", "--base", str(tmp_path / "none")])  # the defaults: no note
    assert "note:" not in capsys.readouterr().out
