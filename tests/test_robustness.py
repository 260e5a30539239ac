"""Robustness, reproducibility and safe files (issue 6).

A run killed at any moment resumes to the same weights; no file is ever half-written; every damaged
or wrong input ends in one line (exit code 2) that names the file, line or flag and says what to do;
nothing is ever unpickled. Cases tested elsewhere are named in the comments, so this file and those
together cover the issue's list.
"""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from microlm.checkpoint import (CheckpointError, load_json, load_weights, read_tensors, save_json, save_optimizer,
                                save_tensors, save_text, save_weights)
from microlm.cli import main
from microlm.data import CorpusError, read_corpus, window_batch
from microlm.finetune import load_lora_run
from microlm.lora import LoRALinear, apply_lora_to_model, load_adapter, save_adapter
from microlm.model import GPT, GPTConfig
from microlm.plots import plot_pretrain_loss
from microlm.runs import load_run
from microlm.sft import SFTDataError, read_sft_jsonl
from microlm.tokenizer import Tokenizer, TokenizerFileError
from microlm.train import (TrainConfig, TrainingDiverged, _trim_metrics, load_checkpoint, make_optimizer, read_metrics,
                           save_checkpoint, train)

_rng = random.Random(0)
CORPUS = "".join(f"{_rng.choice(['Ann', 'Tom', 'Mia', 'Max'])} goes to the "
                 f"{_rng.choice(['park', 'shop', 'beach', 'school'])}.\n" for _ in range(250))
TINY = ["--vocab-size", "300", "--context-length", "32", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
        "--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2", "--eval-every", "3", "--checkpoint-every", "3",
        "--n-samples", "0", "--no-progress"]
TIMINGS = ("tokens_per_s", "mfu")  # the only metrics that may differ between two identical runs


def metrics_without_timings(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny pretrained model folder (root/base) on a plain text corpus, and an adapter for it (root/lora)."""
    root = tmp_path_factory.mktemp("robust")
    (root / "corpus.txt").write_text(CORPUS)
    assert main(["pretrain", "--run-dir", str(root / "base"), "--corpus", str(root / "corpus.txt"), *TINY]) == 0
    model, _, _ = load_run(root / "base")
    apply_lora_to_model(model, r=2, alpha=4)
    save_adapter(model, root / "lora" / "adapter")
    save_json(root / "lora" / "config.json", {"base": str(root / "base")})
    return root


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_clear_line(capsys) -> str:
    """The CLI's stderr after a refused command: one line starting with 'error:', no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---- reproducibility ---------------------------------------------------------------------------
# Same seed, same weights and metrics: pretraining in test_cli.py (test_same_seed_writes_byte_identical_...),
# LoRA and full fine-tuning in test_finetune.py, the loop itself in test_train.py. Ctrl-C on a real
# process and --resume: test_cli.py. What each run folder records: test_finetune.py.


def test_a_run_killed_between_checkpoints_resumes_to_the_same_weights_and_metrics(root, tmp_path):
    flags = ["--corpus", str(root / "corpus.txt"), *TINY, "--max-steps", "40", "--checkpoint-every", "10",
             "--eval-every", "10"]
    assert main(["pretrain", "--run-dir", str(tmp_path / "whole"), *flags]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "microlm.cli", "pretrain", "--run-dir", str(cut), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, metrics = cut / "checkpoint" / "trainer_state.json", cut / "metrics.jsonl"

    def past_a_checkpoint():  # a checkpoint is on disk and at least one step was logged after it
        try:
            saved = json.loads(state.read_text())["step"]
            return saved < len(metrics.read_text().splitlines()) < 40
        except (OSError, ValueError, KeyError):
            return False
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not past_a_checkpoint():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no handler can run: the process just stops
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed between checkpoints"
    saved = json.loads((cut / "checkpoint" / "trainer_state.json").read_text())["step"]
    logged = len((cut / "metrics.jsonl").read_text().splitlines())
    assert 10 <= saved < logged < 40 and not (cut / "model.safetensors").exists()

    assert main(["pretrain", "--run-dir", str(cut), "--resume", *flags]) == 0
    assert (cut / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert metrics_without_timings(cut) == metrics_without_timings(tmp_path / "whole")  # steps 1..40, each once


# ---- nothing lost, nothing half-written --------------------------------------------------------

KILL_MID_WRITE = """
import os, signal, sys, torch
from microlm.checkpoint import save_weights

def killed_mid_write(src, dst):
    # The new file is written to the temporary src; cut it in half, as a kill during the write would
    # leave it, and die before the rename that would put it in place.
    os.truncate(src, os.path.getsize(src) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

os.replace = killed_mid_write
torch.manual_seed(1)
save_weights(sys.argv[1], torch.nn.Linear(64, 64))
"""


def test_a_process_killed_mid_write_leaves_the_previous_file_in_place(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    good = torch.nn.Linear(64, 64)
    save_weights(path, good)
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert path.read_bytes() == before  # a writer that wrote to the file itself would have replaced it
    again = torch.nn.Linear(64, 64)
    load_weights(path, again)
    assert torch.equal(again.weight, good.weight)


class Killed(BaseException):
    """Stands for the process dying: raised where the finished temporary file would be renamed."""


def _tiny_model(seed=0, d_model=16):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=30, context_length=16, d_model=d_model, n_layers=1, n_heads=2))


def _write(kind: str, folder: Path, version: int) -> None:
    """Write one kind of microlm file into `folder`; `version` changes its content."""
    model = _tiny_model(seed=version)
    if kind == "weights":
        save_weights(folder / "model.safetensors", model)
    elif kind == "optimizer state":
        save_optimizer(folder / "optimizer.safetensors", _stepped_optimizer(model))
    elif kind == "json":
        save_json(folder / "summary.json", {"version": version})
    elif kind == "text":
        save_text(folder / "samples.txt", f"sample {version}\n")
    elif kind == "tokenizer":
        from microlm.tokenizer import train_bpe
        Tokenizer.from_bpe(train_bpe(CORPUS[: 300 * (version + 1)], 270)).save(folder / "tokenizer.json")
    elif kind == "adapter":
        lora = apply_lora_to_model(model, r=version + 1, alpha=4)
        save_adapter(lora, folder / "adapter")
    elif kind == "plot":
        plot_pretrain_loss([{"tokens": 1, "val_bpc": 1.0 + version}], folder / "loss.png")
    elif kind == "checkpoint":
        cfg = TrainConfig(max_steps=3)
        save_checkpoint(folder, model, torch.optim.AdamW(model.parameters()), cfg, version, 0, 0.0)
    elif kind == "metrics":
        if version == 0:
            (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
        else:
            _trim_metrics(folder / "metrics.jsonl", 1)  # what --resume does


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` but temporary ones (a kill may leave those; they are never read)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".tmp" not in str(p.relative_to(folder))}


@pytest.mark.parametrize("kind", ["weights", "optimizer state", "json", "text", "tokenizer", "adapter", "plot",
                                  "checkpoint", "metrics"])
def test_every_file_is_written_aside_and_renamed_so_a_kill_keeps_the_previous_one(tmp_path, monkeypatch, kind):
    _write(kind, tmp_path, version=0)
    before = _snapshot(tmp_path)
    assert before

    def die(src, dst):
        raise Killed
    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(Killed):
        _write(kind, tmp_path, version=1)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # the temporary file is deleted, not left behind


@pytest.mark.parametrize("kind", ["weights", "json", "adapter", "plot"])
def test_a_file_written_aside_gets_the_mode_of_a_new_file_not_the_temporary_files_owner_only_one(tmp_path, kind):
    old = os.umask(0o022)
    try:
        _write(kind, tmp_path, version=0)
        (tmp_path / "plain.txt").write_text("x")  # what open() gives under the same umask
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o644
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o777 == want, p


def test_a_metrics_line_cut_off_by_a_kill_is_dropped_and_a_damaged_one_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_lo')  # killed while appending step 3
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(path)


def test_a_non_finite_loss_stops_with_the_step_keeps_the_checkpoint_and_suggests_a_fix(root, tmp_path, capsys):
    # lr 1e30: the first update makes the weights enormous, and the gradient of step 2 is NaN
    run = tmp_path / "diverged"
    assert main(["pretrain", "--run-dir", str(run), "--corpus", str(root / "corpus.txt"), *TINY, "--lr", "1e30",
                 "--checkpoint-every", "1"]) == 2
    err = one_clear_line(capsys)
    assert "at step 2 of 6; the last checkpoint (step 1) is kept in" in err
    assert "Try a lower --lr (now 1e+30)" in err and "--overwrite" in err
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in read_tensors(run / "checkpoint" / "model.safetensors").values())


def test_a_non_finite_gradient_is_caught_before_it_reaches_the_weights(tmp_path, monkeypatch):
    # The loss stays finite; only the gradient of step 3 is NaN. Without the check, opt.step() would write
    # NaN into the weights and the checkpoint of step 3 would save them.
    monkeypatch.setattr("microlm.train.matmul_peak_flops", lambda **k: 1.0)  # only for MFU; saves a second
    model = _tiny_model()
    stream = np.random.default_rng(0).integers(0, 30, 2000).astype(np.int32)
    calls = []
    model.tok_emb.weight.register_hook(lambda g: g * float("nan") if len(calls) == 3 else g)
    cfg = TrainConfig(max_steps=5, batch_size=2, warmup_steps=1, eval_every=5, checkpoint_every=1)

    def batch(i):
        calls.append(i)
        return window_batch(stream, 2, 16, 0, i)
    with pytest.raises(TrainingDiverged, match=r"the gradient norm became nan at step 3 of 5; the last checkpoint "
                                               r"\(step 2\)"):
        train(model, cfg, batch, lambda m: {}, tmp_path, progress=False)
    weights = read_tensors(tmp_path / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_folder_holding_another_run_or_other_files_is_never_mixed_nor_deleted(root, tmp_path, capsys):
    # A second run into a run folder is refused: test_cli.py (test_a_second_run_into_the_same_folder_is_refused).
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    flags = ["--corpus", str(root / "corpus.txt"), *TINY]
    for extra in ([], ["--overwrite"]):
        assert main(["pretrain", "--run-dir", str(mine), *flags, *extra]) == 2
        assert "is not empty and holds no microlm run (thesis.tex)" in one_clear_line(capsys)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]

    run = copy_of(root / "base", tmp_path / "run")
    config = (run / "config.json").read_bytes()
    assert main(["pretrain", "--run-dir", str(run), *flags, "--resume", "--d-model", "32", "--lr", "0.5"]) == 2
    err = one_clear_line(capsys)
    assert f"--resume: {run} was trained with other settings: --d-model 16 (now 32), " in err
    assert "--lr 0.01 (now 0.5); resume with the same flags, or start again with --overwrite" in err
    assert (run / "config.json").read_bytes() == config  # refused before anything was written

    shutil.rmtree(run / "checkpoint")  # a run killed before its first checkpoint
    assert main(["pretrain", "--run-dir", str(run), *flags, "--resume"]) == 2
    assert "no checkpoint to resume from" in one_clear_line(capsys)


def test_overwrite_never_deletes_a_folder_that_only_looks_like_a_run(root, tmp_path, capsys):
    # A Hugging Face model folder has a config.json, tokenizer.json and model.safetensors too.
    hf = tmp_path / "hf-model"
    hf.mkdir()
    for name, text in (("config.json", '{"model_type": "gpt2"}'), ("tokenizer.json", "{}"), ("model.safetensors", "x")):
        (hf / name).write_text(text)
    assert main(["pretrain", "--run-dir", str(hf), "--corpus", str(root / "corpus.txt"), *TINY, "--overwrite"]) == 2
    assert "is not empty and holds no microlm run (config.json, model.safetensors, tokenizer.json)" in one_clear_line(capsys)
    assert main(["merge", "--adapter", str(root / "lora"), "--out", str(hf), "--overwrite"]) == 2
    assert "holds no microlm run" in one_clear_line(capsys)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    # and a refused run writes nothing, not even its corpus into --data-dir
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "train.txt").write_text("my notes")
    run = copy_of(root / "base", tmp_path / "run")
    assert main(["pretrain", "--run-dir", str(run), "--data-dir", str(notes), "--n-train", "20", "--n-val", "5", *TINY]) == 2
    assert "already holds a run" in one_clear_line(capsys)
    assert [p.name for p in notes.iterdir()] == ["train.txt"] and (notes / "train.txt").read_text() == "my notes"


def test_a_run_stopped_before_its_config_was_written_can_be_replaced(root, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text("{}")  # all that pretrain had written when it was stopped
    flags = ["--run-dir", str(run), "--corpus", str(root / "corpus.txt"), *TINY]
    assert main(["pretrain", *flags]) == 2
    assert "already holds a run" in one_clear_line(capsys)
    assert main(["pretrain", *flags, "--overwrite"]) == 0
    _truncate(run / "config.json")  # a config cut short: named on --resume, replaced by --overwrite
    assert main(["pretrain", *flags, "--resume"]) == 2
    assert "config.json: not a valid JSON run config" in one_clear_line(capsys)
    assert main(["pretrain", *flags, "--overwrite"]) == 0


def test_an_interrupted_merge_leaves_the_previous_merged_model(root, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    for sibling in ("merged.tmp", "merged.old"):  # the user's folders beside it are never touched
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "notes.txt").write_text("mine")
    assert main(["merge", "--adapter", str(root / "lora"), "--out", str(out)]) == 0
    assert main(["merge", "--adapter", str(root / "lora"), "--out", str(out), "--overwrite"]) == 0
    before = _snapshot(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("microlm.checkpoint.save_weights", killed)
    assert main(["merge", "--adapter", str(root / "lora"), "--out", str(out), "--overwrite"]) == 130
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.old", "merged.tmp"]
    assert all((tmp_path / s / "notes.txt").read_text() == "mine" for s in ("merged.tmp", "merged.old"))


def test_a_fine_tune_is_never_mixed_with_another_nor_resumed_with_other_settings(root, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Where is {name}?\nA:", "response": " at the park"}) + "\n"
                            for name in ("Ann", "Tom", "Mia", "Max") * 3))
    flags = ["--base", str(root / "base"), "--run-dir", str(tmp_path / "lora"), "--sft-data", str(data), "--r", "2",
             "--max-steps", "2", "--eval-every", "2", "--checkpoint-every", "2", "--batch-size", "2", "--no-progress"]
    assert main(["lora-finetune", *flags]) == 0
    adapter = (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["lora-finetune", *flags]) == 2
    assert "already holds a run; pass --resume to continue it, --overwrite to replace it" in one_clear_line(capsys)
    assert main(["lora-finetune", *flags, "--resume", "--r", "4", "--lr", "0.1"]) == 2
    assert "was trained with other settings: --r 2 (now 4), --lr 0.007 (now 0.1)" in one_clear_line(capsys)
    assert main(["lora-finetune", *flags, "--resume"]) == 0  # finished already: nothing to train, same adapter
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    # bad values are refused before --overwrite deletes the run
    run = _snapshot(tmp_path / "lora")
    for bad, message in ((["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
                         (["--alpha", "inf"], "--alpha must be a finite number > 0"),
                         (["--lr", "0"], "--lr=0.0 is out of range")):
        assert main(["lora-finetune", *flags, "--overwrite", *bad]) == 2
        assert message in one_clear_line(capsys)
    assert _snapshot(tmp_path / "lora") == run
    # and a run never replaces its own base
    base = copy_of(root / "base", tmp_path / "base")
    for run_dir in (base, tmp_path):  # the base's folder, and a folder above it
        assert main(["lora-finetune", *flags, "--base", str(base), "--run-dir", str(run_dir), "--overwrite"]) == 2
        assert f"--run-dir {run_dir} is or holds the base model's folder" in one_clear_line(capsys)
    assert load_run(base)[0] is not None


# ---- clear errors ------------------------------------------------------------------------------


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Boom(marker))


class Boom:
    """Unpickling this touches `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _set_config(run: Path, **model):
    config = json.loads((run / "config.json").read_text())
    config["model"].update(model)
    (run / "config.json").write_text(json.dumps(config))


def _drop_config_key(run: Path, key: str):
    config = json.loads((run / "config.json").read_text())
    del config["model"][key]
    (run / "config.json").write_text(json.dumps(config))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_top(run: Path, **entries):
    path = run / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


def _set_pattern(path: Path, pattern: str):
    path.write_text(json.dumps({**json.loads(path.read_text()), "pattern": pattern}))


MODEL_FOLDER_DAMAGE = {
    "weights missing": (lambda r: (r / "model.safetensors").unlink() or shutil.rmtree(r / "checkpoint"),
                        "model.safetensors: weights file not found"),
    "weights truncated": (lambda r: _truncate(r / "model.safetensors"),
                          "model.safetensors: not a readable safetensors"),
    "weights are JSON": (lambda r: shutil.copy(r / "config.json", r / "model.safetensors"),
                         "model.safetensors: not a readable safetensors"),
    "weights are a pickle": (lambda r: (r / "model.safetensors").write_bytes(_pickle_bytes(r / "PWNED")),
                             "or a pickle/.pt file, which microlm never loads"),
    "weights of NaN": (lambda r: _resave_weights(r / "model.safetensors", float("nan")),
                       "holds NaN or Inf values; the file is damaged (or the run diverged)"),
    "weights of another shape": (lambda r: _set_config(r, d_model=32),
                                 "; weights and config.json are from different models"),
    "config truncated": (lambda r: _truncate(r / "config.json"), "config.json: not a valid JSON run config"),
    "config unknown key": (lambda r: _set_config(r, n_expert=4), "unknown model config keys ['n_expert']"),
    "config missing key": (lambda r: _drop_config_key(r, "n_heads"), "model config is missing keys ['n_heads']"),
    "config is a LoRA run": (lambda r: (r / "config.json").write_text('{"base": "runs/pretrain"}'),
                             "this is not a model folder (it is a LoRA run: its base is runs/pretrain)"),
    "config data not an object": (lambda r: _set_top(r, data=[]), 'config.json: bad "data" entry'),
    "config story data without its world": (lambda r: _set_top(r, data={"kind": "stories"}),
                                            'config.json: bad "data" entry (a story run records its world there)'),
    "tokenizer missing": (lambda r: (r / "tokenizer.json").unlink(), "tokenizer.json: no tokenizer file here"),
    "tokenizer truncated": (lambda r: _truncate(r / "tokenizer.json"), "not a usable microlm tokenizer file"),
    "tokenizer pattern that matches empty text": (lambda r: _set_pattern(r / "tokenizer.json", "a*"),
                                                   "tiktoken cannot split text with the pattern 'a*'"),
    "tokenizer of another run": (lambda r: _set_config(r, vocab_size=1000),
                                 "tokens, but the model in config.json has vocab_size 1000: the tokenizer is from"),
}


@pytest.mark.parametrize("damage", MODEL_FOLDER_DAMAGE)
def test_a_damaged_model_folder_is_refused_naming_the_file(root, tmp_path, capsys, damage):
    run = copy_of(root / "base", tmp_path / "run")
    spoil, message = MODEL_FOLDER_DAMAGE[damage]
    spoil(run)
    assert_refused_naming(capsys, ["sample", "--run-dir", str(run), "--n", "1"], run, message)


def assert_refused_naming(capsys, argv, folder, message):
    """The command exits 2 with one line that holds `message` and names `folder`; no pickle ran."""
    assert main(argv) == 2
    err = one_clear_line(capsys)
    assert message in err and str(folder) in err
    assert not (folder / "PWNED").exists()


def _resumable(run_dir: Path) -> tuple[Path, TrainConfig]:
    """A checkpoint as train() writes it: weights, AdamW state after one step, trainer state."""
    cfg = TrainConfig(max_steps=4, batch_size=2, warmup_steps=1, eval_every=4, checkpoint_every=2)
    model = _tiny_model()
    opt = make_optimizer(model, cfg)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    save_checkpoint(run_dir, model, opt, cfg, 1, 8, 0.5)
    return run_dir / "checkpoint", cfg


CHECKPOINT_DAMAGE = {
    "missing": (lambda c: shutil.rmtree(c), "no checkpoint to resume from (the run stopped before its first one); "
                                            "start it again with --overwrite"),
    "trainer state truncated": (lambda c: _truncate(c / "trainer_state.json"), "not a valid JSON trainer state"),
    "trainer state missing a key": (lambda c: save_json(c / "trainer_state.json", {
        k: v for k, v in json.loads((c / "trainer_state.json").read_text()).items() if k != "optimizer"}),
        "trainer_state.json: missing keys ['optimizer']"),
    "trainer state with a step that is not a number": (lambda c: save_json(c / "trainer_state.json", {
        **json.loads((c / "trainer_state.json").read_text()), "step": "x"}),
        "trainer_state.json: step and tokens_seen must be integers >= 0"),
    "weights truncated": (lambda c: _truncate(c / "model.safetensors"), "not a readable safetensors weights"),
    "optimizer state is a pickle": (lambda c: (c / "optimizer.safetensors").write_bytes(_pickle_bytes(c / "PWNED")),
                                    "which microlm never loads"),
    "optimizer state of another model": (lambda c: save_optimizer(c / "optimizer.safetensors",
                                                                  _stepped_optimizer(_tiny_model(d_model=32))),
                                         "optimizer tensor '0.exp_avg' (30, 32) fits no parameter of this model"),
    "random generator state of the wrong size": (lambda c: save_tensors(c / "rng_state.safetensors", {
        "cpu": torch.zeros(7, dtype=torch.uint8)}), "rng_state.safetensors: not a random generator state torch can take"),
    "random generator state truncated": (lambda c: _truncate(c / "rng_state.safetensors"),
                                         "not a readable safetensors random generator state file"),
}


def _stepped_optimizer(model):
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("damage", [None, *CHECKPOINT_DAMAGE])
def test_a_damaged_checkpoint_is_refused_on_resume(tmp_path, damage):
    ckpt, cfg = _resumable(tmp_path)
    model = _tiny_model(seed=5)
    resume = lambda: load_checkpoint(tmp_path, model, make_optimizer(model, cfg), cfg)  # noqa: E731
    if damage is None:  # the intact checkpoint loads: each refusal below is the damage's doing
        assert resume() == (1, 8, 0.5)
        return
    spoil, message = CHECKPOINT_DAMAGE[damage]
    spoil(ckpt)
    with pytest.raises(CheckpointError) as info:
        resume()
    assert message in str(info.value) and str(tmp_path) in str(info.value)
    assert not (ckpt / "PWNED").exists()


def test_a_kill_between_the_two_renames_of_a_checkpoint_swap_resumes_from_the_previous_one(tmp_path):
    ckpt, cfg = _resumable(tmp_path)
    ckpt.rename(tmp_path / "checkpoint.old")  # replace_dir moved the old folder aside, then the process died
    model = _tiny_model(seed=5)
    assert load_checkpoint(tmp_path, model, make_optimizer(model, cfg), cfg) == (1, 8, 0.5)


def test_a_kill_inside_the_checkpoint_swap_leaves_the_previous_checkpoint_to_resume_from(tmp_path, monkeypatch):
    ckpt, cfg = _resumable(tmp_path)
    real_replace = os.replace

    def die_at_the_second_rename(src, dst):  # the first moved the old checkpoint aside
        if Path(src).name == "checkpoint.tmp":
            raise Killed
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", die_at_the_second_rename)
    model = _tiny_model(seed=5)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, model, make_optimizer(model, cfg), cfg, 2, 16, 1.0)
    monkeypatch.undo()
    assert not ckpt.exists() and (tmp_path / "checkpoint.old").is_dir()
    assert load_checkpoint(tmp_path, model, make_optimizer(model, cfg), cfg) == (1, 8, 0.5)


def _resave_weights(path: Path, add: float = 1.0):
    """The same keys and shapes with other values: what a save that died after the weights leaves."""
    from safetensors.torch import load_file, save_file
    save_file({k: v + add for k, v in load_file(str(path)).items()}, str(path))


def _drop_a_layer(lora: Path):
    """Weights without one layer's A, with a config that vouches for them: keys must still be checked."""
    from safetensors.torch import load_file, save_file
    from microlm.runs import sha256_file
    path = lora / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors["blocks.0.attn.q_proj.lora_A.weight"]
    save_file(tensors, str(path))
    _edit_adapter_config(lora, weights_sha256=sha256_file(path))


def _edit_adapter_config(lora: Path, **changes):
    path = lora / "adapter" / "adapter_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


ADAPTER_DAMAGE = {
    "adapter missing": (lambda a: shutil.rmtree(a / "adapter"), "no adapter here (adapter_config.json is missing)"),
    "weights truncated": (lambda a: _truncate(a / "adapter" / "adapter_model.safetensors"),
                          "adapter_model.safetensors: not a readable safetensors adapter file"),
    "weights of another save (cut off between the two files)": (
        lambda a: _resave_weights(a / "adapter" / "adapter_model.safetensors"),
        "these weights are not the ones"),
    "weights are a pickle": (lambda a: (a / "adapter" / "adapter_model.safetensors").write_bytes(
        _pickle_bytes(a / "PWNED")), "which microlm never loads"),
    "config of another kind": (lambda a: shutil.copy(a / "config.json", a / "adapter" / "adapter_config.json"),
                               "not a microlm LoRA adapter (format None, expected 'microlm-lora')"),
    "config missing a key": (lambda a: _edit_adapter_config(a, base_fingerprint=None),
                             "adapter_config.json: missing keys ['base_fingerprint']"),
    "config unknown key": (lambda a: _edit_adapter_config(a, lora_bias="all"),
                           "adapter_config.json: unknown keys ['lora_bias']"),
    "weights missing a layer": (_drop_a_layer, "adapter keys do not match: missing "
                                               "['blocks.0.attn.q_proj.lora_A.weight'], unexpected []"),
    "rank 0": (lambda a: _edit_adapter_config(a, r=0), "r must be an integer >= 1"),
    "dropout that is not a number": (lambda a: _edit_adapter_config(a, dropout="x"),
                                     "dropout a number in [0, 1) and use_rslora true or false; got"),
    "run config naming no folder": (lambda a: (a / "config.json").write_text('{"base": 5}'),
                                    'config.json: "base" must be the base model\'s folder, got 5'),
    "rank that does not fit the weights": (lambda a: _edit_adapter_config(a, r=4),
                                           ".lora_A has shape (2, 16), expected (4, 16)"),
    "targets that do not fit the weights": (lambda a: _edit_adapter_config(a, targets=["q_proj"]),
                                            "adapter keys do not match: missing [], unexpected ['blocks.0.attn.k_proj"),
    "targets the base does not have": (lambda a: _edit_adapter_config(a, targets=["o_proj"]),
                                       "adapter_config.json: unknown LoRA target(s) ['o_proj']"),
    "another base": (lambda a: _edit_adapter_config(a, base_fingerprint="0123456789abcdef"),
                     "this adapter was trained on another base model (fingerprint 0123456789abcdef != "),
}


@pytest.mark.parametrize("damage", ADAPTER_DAMAGE)
def test_a_damaged_or_mismatched_adapter_is_refused_naming_the_file(root, tmp_path, capsys, damage):
    # Adapters for another rank or target set, loaded by the library: test_lora.py; bad --r and --targets:
    # test_finetune.py (test_bad_lora_settings_are_refused_with_the_valid_range).
    lora = copy_of(root / "lora", tmp_path / "lora")
    spoil, message = ADAPTER_DAMAGE[damage]
    spoil(lora)
    assert_refused_naming(capsys, ["sample", "--adapter", str(lora), "--n", "1"], lora, message)


def test_a_corpus_that_is_missing_or_too_small_for_one_window_is_named(root, tmp_path, capsys):
    # Empty, not UTF-8 and too short: test_cli.py (test_bad_corpus_files_get_a_clear_error).
    missing = tmp_path / "nope.txt"
    assert main(["pretrain", "--corpus", str(missing), "--run-dir", str(tmp_path / "r"), *TINY]) == 2
    assert f"{missing}: corpus file not found" in one_clear_line(capsys)
    run = copy_of(root / "base", tmp_path / "run")
    before = (run / "model.safetensors").read_bytes()
    assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run-dir", str(run), "--overwrite", *TINY,
                 "--context-length", "2000"]) == 2
    err = one_clear_line(capsys)
    assert "training tokens, fewer than one window of --context-length 2000" in err and "corpus.txt" in err
    assert (run / "model.safetensors").read_bytes() == before  # refused before --overwrite deleted anything
    assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run-dir", str(run), "--overwrite", *TINY,
                 "--context-length", "200"]) == 2  # enough training text, but not for one validation window
    err = one_clear_line(capsys)
    assert f"{root / 'corpus.txt'}: the validation split (the last 10% of the corpus) has " in err
    assert "too few for one window of --context-length 200; use more text or a shorter context" in err
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("content, message", [
    (None, "fine-tuning file not found"),
    (b"", "no examples"),
    (b'{"prompt": "a", "response": "b"}\n1' + b"1" * 5000 + b"\n", "line 2: not valid JSON"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n',
     "line 2: expected an object with \"prompt\" and \"response\"; missing ['response']"),
    (b'{"prompt": "a", "response": ""}\n', 'line 1: "prompt" and "response" must be non-empty strings'),
    (b'\xff{"prompt": "a", "response": "b"}\n', "not UTF-8 (byte 0)"),
])
def test_bad_sft_files_are_named_by_file_and_line(tmp_path, content, message):
    # Bad JSON, missing keys, empty strings and non-objects: test_sft.py (test_bad_jsonl_lines_are_named).
    path = tmp_path / "my.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SFTDataError) as info:
        read_sft_jsonl(path)
    assert str(info.value).startswith(f"{path}") and message in str(info.value)


def test_sft_lines_are_split_at_newlines_only_and_a_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "my.jsonl"
    rows = [{"prompt": "a\u2028b\x0cc\x1ed", "response": " x"}, {"prompt": "Q", "response": " y", "kind": "k"}]
    path.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert read_sft_jsonl(path) == rows


def test_sft_examples_that_do_not_fit_the_context_are_refused_when_none_is_left(root, tmp_path, capsys):
    # One long example among short ones is skipped and counted: test_finetune.py.
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Ann goes to the park. " * 20, "response": " park"}) + "\n"
                            for _ in range(4)))
    assert main(["lora-finetune", "--base", str(root / "base"), "--run-dir", str(tmp_path / "r"),
                 "--sft-data", str(data), "--max-steps", "1", "--no-progress"]) == 2
    assert "no training example fits the model's context of 32 tokens" in one_clear_line(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size=0 is out of range (>= 1)"),
    (["--lr", "-0.1"], "--lr=-0.1 is out of range (> 0)"),
    (["--max-steps", "0"], "--max-steps=0 is out of range (>= 1)"),
    (["--warmup-steps", "-1"], "--warmup-steps=-1 is out of range (>= 0)"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio=2.0 is out of range (in [0, 1])"),
    (["--context-length", "0"], "--context-length must be >= 1, got 0"),
    (["--d-model", "18"], "--d-model (18) must be n_heads (2) times an even head size"),
    (["--vocab-size", "100"], "--vocab-size must be at least 257 (256 byte tokens and the end-of-text token), got 100"),
    (["--seed", str(2**64)], "--seed=18446744073709551616 is out of range (a 64-bit integer)"),
])
def test_impossible_pretraining_values_name_the_flag_and_the_valid_range(root, tmp_path, capsys, flags, message):
    assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run-dir", str(tmp_path / "r"), *TINY,
                 *flags]) == 2
    assert message in one_clear_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command, message", [
    (["lora-finetune", "--alpha", "0"], "--alpha must be a finite number > 0"),
    (["lora-finetune", "--r", "-2"], "--r must be >= 1 (a LoRA rank), got -2"),
    (["finetune", "--full", "--batch-size", "0"], "--batch-size=0 is out of range (>= 1)"),
    (["sample", "--n", "0"], "--n must be >= 1"),
    (["sample", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["sample", "--top-k", "0"], "--top-k must be >= 1"),
])
def test_impossible_fine_tuning_and_sampling_values_are_refused(root, tmp_path, capsys, command, message):
    where = ["--run-dir", str(root / "base")] if command[0] == "sample" else \
        ["--base", str(root / "base"), "--run-dir", str(tmp_path / "r")]
    assert main([*command, *where]) == 2
    assert message in one_clear_line(capsys)


def test_a_prompt_longer_than_the_context_is_refused_or_cut_from_the_left_on_request(root, capsys):
    long_prompt = "Ann goes to the park. " * 20  # about 100 tokens; the context is 32
    assert main(["sample", "--run-dir", str(root / "base"), "--prompt", long_prompt]) == 2
    err = one_clear_line(capsys)
    assert "but the model's context is 32, which leaves room for 31; shorten it, or pass --truncate-prompt" in err
    assert main(["sample", "--run-dir", str(root / "base"), "--prompt", long_prompt, "--truncate-prompt",
                 "--n", "2", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "sees only its last 31 tokens (the first" in err
    assert out.count(long_prompt) == 2  # each sample is the whole prompt and its continuation


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_asking_for_a_device_that_is_not_there_is_refused(root, tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    for command in (["sample", "--run-dir", str(root / "base")],
                    ["lora-finetune", "--base", str(root / "base"), "--run-dir", str(tmp_path / "r")],
                    ["pretrain", "--corpus", str(root / "corpus.txt"), "--run-dir", str(tmp_path / "r"), *TINY]):
        assert main([*command, "--device", device]) == 2
        assert f"device '{device}' is not available on this machine; available: cpu" in one_clear_line(capsys)
    assert not (tmp_path / "r").exists()


# ---- safe files --------------------------------------------------------------------------------
# The package is scanned for pickle and torch.load: test_safety.py.


def test_a_malicious_pickle_handed_to_any_loader_is_refused_and_never_run(root, tmp_path):
    lora_dir = copy_of(root / "lora", tmp_path / "lora")  # an intact adapter on an intact base: only the pickle fails
    save_json(lora_dir / "config.json", {"base": str(copy_of(root / "base", tmp_path / "base"))})
    model_dir = copy_of(root / "base", tmp_path / "model")
    _, cfg = _resumable(tmp_path / "run")
    model, adapted = _tiny_model(), apply_lora_to_model(_tiny_model(), r=2, alpha=4)
    loaders = {  # every loader of a file a user can hand to microlm: (the file it reads, the call)
        "weights": (tmp_path / "model.safetensors", lambda p: load_weights(p, model)),
        "run config": (model_dir / "config.json", lambda p: load_run(p.parent)),
        "any JSON file": (tmp_path / "x.json", load_json),
        "tokenizer": (tmp_path / "tokenizer.json", Tokenizer.load),
        "adapter weights": (lora_dir / "adapter" / "adapter_model.safetensors", lambda p: load_lora_run(lora_dir)),
        "adapter config": (tmp_path / "adapter" / "adapter_config.json", lambda p: load_adapter(adapted, p.parent)),
        "optimizer state": (tmp_path / "run" / "checkpoint" / "optimizer.safetensors",
                            lambda p: load_checkpoint(tmp_path / "run", model, make_optimizer(model, cfg), cfg)),
        "fine-tuning data": (tmp_path / "x.jsonl", read_sft_jsonl),
        "corpus": (tmp_path / "x.txt", read_corpus),
        "metrics": (tmp_path / "metrics.jsonl", read_metrics),
    }
    marker = tmp_path / "PWNED"
    for name, (path, load) in loaders.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_pickle_bytes(marker))
        with pytest.raises((CheckpointError, TokenizerFileError, SFTDataError, CorpusError)) as info:
            load(path)
        assert str(path) in str(info.value), name  # refused because of this file, not an earlier one
        assert not marker.exists(), name


# ---- property and fuzz tests -------------------------------------------------------------------
# The tokenizer's round trip on arbitrary Unicode: test_tokenizer.py (test_plain_text_round_trips and
# test_text_with_special_tokens_round_trips). Hypothesis runs derandomized here: the same cases every run.

JSONISH = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(
    [b"{", b"}", b"[", b'"prompt"', b'"response"', b":", b",", b'"x"', b'""', b"1e999", b"null", b"\n", b"\r\n",
     b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"\\u0000", b"\\ud800", b"NaN"])), max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.binary(max_size=200), JSONISH))
def test_the_sft_loader_on_random_bytes_raises_nothing_but_its_own_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        examples = read_sft_jsonl(path)
    except SFTDataError as e:
        assert str(e).startswith(str(path))
    else:
        assert examples and all(isinstance(ex["prompt"], str) and ex["prompt"] for ex in examples)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 12), alpha=st.floats(0.01, 64),
       rslora=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_merge_and_unmerge_identities_on_random_shapes_ranks_and_scales(d_in, d_out, r, alpha, rslora, bias,
                                                                              seed):
    r = min(r, d_in, d_out)
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=bias).double()
    layer = LoRALinear(base, r, alpha, use_rslora=rslora)
    with torch.no_grad():  # non-zero A and B: with B = 0 every identity below would hold for any merge code
        layer.lora_A.weight.copy_(torch.randn(r, d_in, generator=g, dtype=torch.float64))
        layer.lora_B.weight.copy_(torch.randn(d_out, r, generator=g, dtype=torch.float64))
    x = torch.randn(5, d_in, generator=g, dtype=torch.float64)
    w = base.weight.detach().clone()
    delta = layer.delta_weight()
    scale = alpha / (r ** 0.5 if rslora else r)
    torch.testing.assert_close(delta, scale * layer.lora_B.weight @ layer.lora_A.weight, rtol=1e-12, atol=1e-12)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged, base(x) + x @ delta.T, rtol=1e-12, atol=1e-12)  # W x + s B A x
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)  # float64: rounding only
    torch.testing.assert_close(base.weight, w + delta, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()  # W + d - d: equal to W up to rounding, not bit for bit
    torch.testing.assert_close(base.weight, w, rtol=1e-12, atol=1e-12 * (1 + delta.abs().max().item()))
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)
