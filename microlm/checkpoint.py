"""Files: weights in safetensors, everything else in JSON, every write atomic.

Nothing here unpickles: safetensors holds raw tensors only, and JSON holds plain data, so a file
handed to microlm can never run code. Each write goes to a temporary file in the same folder and is
then renamed over the target (`os.replace` is atomic on POSIX and Windows), so a process killed
mid-write leaves the previous good file in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A run file is missing, truncated, of the wrong kind or does not fit the model."""


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # a new name, created with the umask's mode
    mode = tmp.stat().st_mode
    try:
        yield tmp
        os.chmod(tmp, mode)  # that mode again: some writers (safetensors) make their file owner-only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_json(path: str | Path, obj) -> None:
    save_text(path, json.dumps(obj, indent=2) + "\n")


def load_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid JSON {what} ({e}); the file may be truncated or of another kind") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object for the {what}")
    return obj


def check_keys(obj: dict, path: str | Path, required, optional=()) -> None:
    """Refuse a JSON object with missing or unknown keys, naming them: a guessed default would hide
    a damaged file, or one written by another program or version."""
    missing, unknown = sorted(set(required) - set(obj)), sorted(set(obj) - set(required) - set(optional))
    if missing or unknown:
        found = "; ".join(f"{kind} keys {keys}" for kind, keys in (("missing", missing), ("unknown", unknown)) if keys)
        raise CheckpointError(f"{path}: {found}; the file is damaged or was not written by this version of microlm")


def changed_settings(saved: dict, now: dict) -> str:
    """'--lr 0.01 (now 0.003), ...' for every setting whose saved value differs; '' if none does."""
    return ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {v})" for k, v in now.items() if saved.get(k) != v)


def unique_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (tied embeddings keep their first name)."""
    out, seen = {}, set()
    for name, t in module.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t.detach().cpu().contiguous()
    return out


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict | None = None) -> None:
    save_tensors(path, unique_tensors(module), {k: str(v) for k, v in (metadata or {}).items()})


def read_tensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found; was the run finished? (an interrupted run "
                              "continues with --resume)")
    try:
        return load_file(str(path))
    except PermissionError:
        raise CheckpointError(f"{path}: no permission to read this {what} file; check its owner and mode") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors {what} file ({e}); it may be truncated, "
                              "or a pickle/.pt file, which microlm never loads") from None


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Load weights strictly: every key must match by name and shape (tied copies excepted)."""
    tensors = read_tensors(path)
    expected = unique_tensors(module)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"{path}: '{k}' has shape {tuple(t.shape)}, the config asks for "
                                  f"{tuple(expected[k].shape)}; weights and config.json are from different models")
        if not t.is_floating_point() or not torch.isfinite(t).all():  # a model of NaNs samples nonsense, then fails
            raise CheckpointError(f"{path}: '{k}' holds {'NaN or Inf' if t.is_floating_point() else t.dtype} values; "
                                  "the file is damaged (or the run diverged): use an earlier checkpoint or train again")
    module.load_state_dict(tensors, strict=False)


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of every tensor's name, shape and values: tells two models apart."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer tensors to safetensors; returns the JSON-able rest (param groups)."""
    sd = optimizer.state_dict()
    save_tensors(path, {f"{i}.{k}": v for i, state in sd["state"].items() for k, v in state.items()})
    return {"param_groups": sd["param_groups"]}


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer, groups: dict) -> None:
    """Load what save_optimizer wrote; every state tensor must fit its parameter (AdamW's moments have its shape)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, t in read_tensors(path, "optimizer state").items():
        i, _, name = key.partition(".")
        if not (i.isdigit() and int(i) < len(params) and (t.dim() == 0 or t.shape == params[int(i)].shape)):
            raise CheckpointError(f"{path}: optimizer tensor '{key}' {tuple(t.shape)} fits no parameter of this "
                                  "model; the checkpoint is from another run")
        state.setdefault(int(i), {})[name] = t
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the optimizer settings do not fit this model ({e}); the checkpoint is "
                              "damaged or from another run") from None


def replace_dir(tmp_dir: Path, final_dir: Path, old: Path | None = None) -> None:
    """Swap a fully written folder into place; a crash at any point leaves one complete copy. The folder it
    replaces is moved to `old` (default: FINAL.old, where a resumed run looks for its checkpoint) first."""
    old = old or final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)
