"""The training loop: schedule, determinism, checkpoints and exact resume, Ctrl-C, divergence."""

import json
import math

import numpy as np
import pytest
import torch

from microlm.checkpoint import unique_tensors
from microlm.data import window_batch
from microlm.model import GPT, GPTConfig
from microlm.train import TrainConfig, TrainingDiverged, TrainingInterrupted, lr_at, train

STREAM = np.random.default_rng(0).integers(0, 30, 5000).astype(np.int32)
CFG = TrainConfig(max_steps=10, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=3, eval_every=5,
                  checkpoint_every=3, seed=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # As in test_model.py: tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    # OpenMP's waiting threads made this file about 8x slower. Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def new_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, context_length=16, d_model=16, n_layers=1, n_heads=2))


def run(run_dir, cfg=CFG, resume=False, get_batch=None, model=None):
    model = model or new_model()
    get_batch = get_batch or (lambda i: window_batch(STREAM, cfg.batch_size, 16, cfg.seed, i))
    summary = train(model, cfg, get_batch, lambda m: {"val_loss": 1.0}, run_dir, resume=resume, progress=False)
    return model, summary


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=11, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(7, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, cfg) == pytest.approx(0.1)


def test_every_optimizer_step_uses_the_scheduled_learning_rate(tmp_path, monkeypatch):
    seen, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run(tmp_path / "r")
    assert seen == [[lr_at(s, CFG)] * 2 for s in range(CFG.max_steps)]  # both groups: decayed and not
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[4])["lr"] == lr_at(4, CFG)


def test_a_run_no_longer_than_its_warm_up_says_it_never_decays(tmp_path, capsys):
    run(tmp_path / "a")
    assert "note: --warmup-steps" not in capsys.readouterr().out
    run(tmp_path / "b", cfg=TrainConfig(**{**CFG.__dict__, "warmup_steps": 9}))
    assert "note: --warmup-steps 9 leaves none of the --max-steps 10 for the decay: the learning rate ends at 0.01 " \
           "(--lr 0.01)" in capsys.readouterr().out


def test_two_accumulated_micro_batches_step_like_one_batch_of_both(tmp_path):
    rows = [window_batch(STREAM, 2, 16, 1, i) for i in range(6)]  # 3 steps x 2 micro-batches of 2 rows

    def joined(i):  # step i's two micro-batches as one batch of 4
        return tuple(torch.cat([rows[2 * i][k], rows[2 * i + 1][k]]) for k in (0, 1))
    cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, eval_every=3,
                      checkpoint_every=3)
    accumulated, s1 = run(tmp_path / "a", cfg=cfg, get_batch=lambda i: rows[i])
    one, s2 = run(tmp_path / "b", cfg=TrainConfig(**{**cfg.__dict__, "batch_size": 4, "grad_accum": 1}),
                  get_batch=joined)
    for (name, x), y in zip(unique_tensors(accumulated).items(), unique_tensors(one).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read("a"), read("b")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)


def test_accumulated_micro_batches_with_masked_targets_step_like_one_batch_of_both(tmp_path):
    # Fine-tuning trains on answers only: micro-batches hold different numbers of targets (2 and 7 here,
    # and none at all in a third), and the step must follow the mean over all of the step's targets.
    from microlm.data import IGNORE
    rows = [tuple(t.clone() for t in window_batch(STREAM, 1, 16, 1, i)) for i in range(9)]  # x, y share memory
    for i, keep in enumerate([2, 7, 0] * 3):
        rows[i][1][:, keep:] = IGNORE

    def joined(i):  # step i's micro-batches as one batch of 3
        return tuple(torch.cat([rows[3 * i + j][k] for j in range(3)]) for k in (0, 1))
    cfg = TrainConfig(max_steps=3, batch_size=1, grad_accum=3, lr=1e-2, warmup_steps=1, eval_every=3,
                      checkpoint_every=3)
    accumulated, _ = run(tmp_path / "a", cfg=cfg, get_batch=lambda i: rows[i])
    one, _ = run(tmp_path / "b", cfg=TrainConfig(**{**cfg.__dict__, "batch_size": 3, "grad_accum": 1}),
                 get_batch=joined)
    for (name, x), y in zip(unique_tensors(accumulated).items(), unique_tensors(one).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read("a"), read("b")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)


def test_a_step_with_no_target_at_all_is_a_clear_error(tmp_path):
    from microlm.data import IGNORE
    x = torch.zeros(2, 16, dtype=torch.long)
    cfg = TrainConfig(max_steps=1, batch_size=2, grad_accum=2, eval_every=1, checkpoint_every=1)
    with pytest.raises(ValueError, match="step 1's batch holds no target to learn from"):
        run(tmp_path, cfg=cfg, get_batch=lambda i: (x, torch.full_like(x, IGNORE)))


def test_same_seed_same_weights_and_metrics(tmp_path):
    a, _ = run(tmp_path / "a")
    b, _ = run(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}  # noqa: E731
                       for line in p.read_text().splitlines()]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path):
    full, _ = run(tmp_path / "full")

    def interrupt_at_step_7(i):
        if i == 7 * CFG.grad_accum:
            raise KeyboardInterrupt
        return window_batch(STREAM, CFG.batch_size, 16, CFG.seed, i)
    with pytest.raises(TrainingInterrupted) as info:
        run(tmp_path / "cut", get_batch=interrupt_at_step_7)
    assert info.value.step == 7
    resumed, summary = run(tmp_path / "cut", resume=True)
    assert summary["steps"] == 10
    for (name, x), y in zip(unique_tensors(full).items(), unique_tensors(resumed).values()):
        assert torch.equal(x, y), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # no step logged twice


def test_a_resumed_run_draws_the_dropout_masks_an_uninterrupted_one_would(tmp_path):
    from microlm.lora import apply_lora_to_model

    def lora_model():  # dropout draws from the global generator, which new_model() seeds afresh on every start
        return apply_lora_to_model(new_model(), r=2, alpha=4, dropout=0.5)
    full, _ = run(tmp_path / "full", model=lora_model())

    def interrupt_inside_step_7(i):  # at its second micro-batch: the first has drawn its masks already
        if i == 7 * CFG.grad_accum + 1:
            raise KeyboardInterrupt
        return window_batch(STREAM, CFG.batch_size, 16, CFG.seed, i)
    with pytest.raises(TrainingInterrupted) as info:
        run(tmp_path / "cut", get_batch=interrupt_inside_step_7, model=lora_model())
    assert info.value.step == 7
    resumed, _ = run(tmp_path / "cut", resume=True, model=lora_model())
    for (name, x), y in zip(unique_tensors(full).items(), unique_tensors(resumed).values()):
        assert torch.equal(x, y), name
    assert not torch.equal(full.blocks[0].attn.q_proj.lora_B.weight, torch.zeros(16, 2))  # training moved B


def test_resume_with_other_settings_is_refused(tmp_path):
    run(tmp_path / "r")
    with pytest.raises(ValueError, match="lr"):
        run(tmp_path / "r", cfg=TrainConfig(**{**CFG.__dict__, "lr": 5e-3}), resume=True)


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    model = new_model()
    run(tmp_path / "d", model=model)
    before = (tmp_path / "d" / "checkpoint" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.tok_emb.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="step 1 of 10.*lower --lr"):
        run(tmp_path / "d2", model=model)
    assert (tmp_path / "d" / "checkpoint" / "model.safetensors").read_bytes() == before


def test_impossible_settings_name_the_flag_and_the_range():
    with pytest.raises(ValueError, match="--lr=-1.*> 0"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="--batch-size=0"):
        TrainConfig(batch_size=0)


def test_resuming_a_finished_run_reports_without_training(tmp_path):
    model, _ = run(tmp_path / "done")
    again, summary = run(tmp_path / "done", resume=True)
    assert summary["steps"] == CFG.max_steps and summary["val_loss"] == 1.0
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_compile_that_fails_falls_back_to_eager_with_the_same_result(tmp_path, monkeypatch, capsys):
    # Where torch.compile cannot work (no C++ compiler, say), it fails at the first call; training then
    # says so and goes on eagerly, ending exactly where an eager run ends.
    def broken_compile(model):
        def fail(*args):
            raise RuntimeError("no C++ compiler found")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = TrainConfig(**{**CFG.__dict__, "compile": True, "grad_accum": 1})
    compiled_then_eager, _ = run(tmp_path / "a", cfg=cfg)
    assert "torch.compile failed (RuntimeError: no C++ compiler found); training without it" in capsys.readouterr().out
    eager, _ = run(tmp_path / "b", cfg=TrainConfig(**{**CFG.__dict__, "grad_accum": 1}))
    assert all(torch.equal(x, y) for x, y in zip(compiled_then_eager.state_dict().values(), eager.state_dict().values()))
