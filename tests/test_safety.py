"""No pickle anywhere: every loader refuses a pickle file instead of running it."""

import pickle
import re
from pathlib import Path

import pytest

import microlm
from microlm.checkpoint import CheckpointError, load_weights
from microlm.cli import main
from microlm.model import GPT, GPTConfig
from microlm.tokenizer import Tokenizer, TokenizerFileError


class Boom:
    def __reduce__(self):  # unpickling this would create a file: proof that code ran
        return (Path.touch, (Path(__file__).with_name("PWNED"),))


def test_the_package_never_unpickles():
    for path in Path(microlm.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M), path
        # the other ways to unpickle: modules built on pickle, and numpy's opt-in
        assert not re.search(r"^\s*(import|from) (dill|shelve|joblib|cloudpickle|marshal)\b", text, re.M), path
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_a_malicious_pickle_is_refused_by_every_loader(tmp_path):
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="never loads"):
        load_weights(evil, GPT(GPTConfig(vocab_size=10, context_length=8, d_model=8, n_layers=1, n_heads=2)))
    with pytest.raises(TokenizerFileError):
        Tokenizer.load(evil)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(pickle.dumps(Boom()))
    assert main(["sample", "--run-dir", str(run)]) == 2
    assert not Path(__file__).with_name("PWNED").exists()
