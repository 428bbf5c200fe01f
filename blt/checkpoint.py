"""Model checkpoints: safetensors weights + JSON config, written atomically.

A model folder holds:
    config.json                  BLTConfig (patcher threshold included)
    model.safetensors            BLT weights (encoder, global model, decoder)
    entropy_model.safetensors    the frozen entropy model (entropy-based patching only)
    patcher_threshold.json       optional: how θ was calibrated (written by train_entropy)

An entropy-model folder (train_entropy's output) holds entropy_config.json and
entropy_model.safetensors. Every load error is a one-line CheckpointError.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blt.config import BLTConfig, ConfigError, EntropyModelConfig, entropy_config_from_dict, load_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ENTROPY_CONFIG = "entropy_config.json"
ENTROPY_WEIGHTS = "entropy_model.safetensors"
THRESHOLD = "patcher_threshold.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match its config."""


def atomic_dir_write(path: str | Path, write) -> None:
    """Call write(tmp_dir) then swap tmp_dir into place, so a crash never leaves a half-written
    folder at `path` (the previous version survives until the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _contiguous(sd: dict, dtype: torch.dtype | None = None) -> dict:
    """CPU, contiguous tensors; floating ones cast to dtype if given (e.g. bf16 to ship small)."""
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
    return {k: cast(v.detach()).contiguous().cpu() for k, v in sd.items()}


def model_state_dict(model) -> dict:
    """BLT weights without the entropy model (saved on its own)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("entropy_model.")}


def write_model_files(model, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write config + weights of `model` (a BLT, possibly wrapped by compile) into folder.
    Weights stored in another dtype (bf16) are cast back to the model's dtype on load."""
    model.cfg.to_json(folder / CONFIG)
    save_file(_contiguous(model_state_dict(model), dtype), folder / WEIGHTS)
    if model.entropy_model is not None:
        save_file(_contiguous(model.entropy_model.state_dict(), dtype), folder / ENTROPY_WEIGHTS)


def save_model(model, path: str | Path, extra_json: dict[str, dict] | None = None, dtype: torch.dtype | None = None) -> None:
    def write(tmp):
        write_model_files(model, tmp, dtype)
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)

    atomic_dir_write(path, write)


def read_safetensors(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({e})") from None


def load_weights(module: torch.nn.Module, sd: dict, what: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not match its config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    bad = [k for k in sd if sd[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{what} does not match its config: shape of {bad[0]} is "
                              f"{tuple(sd[bad[0]].shape)}, config needs {tuple(own[bad[0]].shape)}")
    module.load_state_dict(sd)


def write_entropy_model_files(model, folder: Path) -> None:
    """Write config + weights of an EntropyModel into folder."""
    write_json(folder / ENTROPY_CONFIG, model.cfg.__dict__)
    save_file(_contiguous(model.state_dict()), folder / ENTROPY_WEIGHTS)


def save_entropy_model(model, path: str | Path, extra_json: dict[str, dict] | None = None) -> None:
    def write(tmp):
        write_entropy_model_files(model, tmp)
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)

    atomic_dir_write(path, write)


def load_entropy_model(path: str | Path, device="cpu", cfg: EntropyModelConfig | None = None):
    from blt.entropy_model import EntropyModel

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"entropy model folder not found: {path}")
    if cfg is None:
        try:
            cfg = entropy_config_from_dict(load_json(path / ENTROPY_CONFIG, "entropy model config"))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    model = EntropyModel(cfg)
    load_weights(model, read_safetensors(path / ENTROPY_WEIGHTS), f"entropy model weights in {path}")
    return model.to(device).eval()


def load_model(path: str | Path, device="cpu"):
    """Load a BLT folder of ours, or a Hugging Face BltForCausalLM folder (via convert_hf)."""
    from blt.model import BLT

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    cfg_path = path / CONFIG
    raw = None
    try:
        raw = load_json(cfg_path, "config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if raw.get("model_type") == "blt":
        from blt.convert_hf import load_hf_checkpoint

        return load_hf_checkpoint(path).to(device).eval()
    try:
        cfg = BLTConfig.from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"bad config in {cfg_path}: {e}") from None
    entropy_model = None
    if cfg.patcher.needs_entropy:
        entropy_model = load_entropy_model(path, device, cfg.entropy_model)
    model = BLT(cfg)
    load_weights(model, read_safetensors(path / WEIGHTS), f"model weights in {path}")
    if entropy_model is not None:
        model.set_entropy_model(entropy_model)
    return model.to(device).eval()
