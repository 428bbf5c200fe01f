"""Model checkpoints: safetensors weights + JSON config, written atomically.

A model folder holds:
    config.json                  BLTConfig (patcher threshold included)
    model.safetensors            BLT weights (encoder, global model, decoder)
    entropy_model.safetensors    the frozen entropy model (entropy-based patching only)
    patcher_threshold.json       optional: how θ was calibrated (written by train_entropy)

An entropy-model folder (train_entropy's output) holds entropy_config.json and
entropy_model.safetensors. A training checkpoint is a model folder plus train_state.pt.

Safety rules: loading reads tensors and JSON only (no pickled code); weights with inf or NaN
are refused, at load and at save; a folder is replaced only if it holds nothing but these
files, and only once its replacement is written and reads back. Every load error is a one-line
CheckpointError, every failed write a WriteError.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from blt.config import BLTConfig, ConfigError, EntropyModelConfig, entropy_config_from_dict, load_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ENTROPY_CONFIG = "entropy_config.json"
ENTROPY_WEIGHTS = "entropy_model.safetensors"
THRESHOLD = "patcher_threshold.json"
TRAIN_STATE = "train_state.pt"
TOKEN_LM_CONFIG = "token_lm_config.json"  # blt.train_bpe's model folder (blt.bpe.load_token_lm)
TOKEN_LM_WEIGHTS = "token_lm.safetensors"
TOKENIZER = "tokenizer.json"
HELDOUT = "heldout.json"
MODEL_FILES = frozenset({CONFIG, WEIGHTS, ENTROPY_CONFIG, ENTROPY_WEIGHTS, THRESHOLD, TOKEN_LM_CONFIG, TOKEN_LM_WEIGHTS,
                         TOKENIZER, HELDOUT})  # fmt: skip
CHECKPOINT_FILES = MODEL_FILES | {TRAIN_STATE}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match its config."""


class WriteError(CheckpointError):
    """A folder that could not be written (disk full, no permission): what was there is kept."""

    def __init__(self, path: Path, error: Exception | str):
        self.errno = getattr(error, "errno", None) or _os_error_number(str(error))
        super().__init__(f"could not write {path}: {os.strerror(self.errno) if self.errno else error}")


def _os_error_number(text: str) -> int | None:
    """safetensors reports a failed write as text ("... (os error 28) ..."), not as an OSError."""
    found = re.search(r"os error (\d+)", text)
    return int(found[1]) if found else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_replaceable(path: Path, own: frozenset = MODEL_FILES) -> None:
    """Refuse to replace anything but an empty folder or one of the tool's own folders (a model
    folder, or with `own` = CHECKPOINT_FILES a checkpoint): nothing the tool did not write is
    ever deleted."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{path} exists and is a file or a link, not a folder: choose another path")
    entries = list(path.iterdir())
    foreign = sorted(e.name for e in entries if e.name not in own or e.is_symlink() or not e.is_file())
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CheckpointError(f"{path} holds files this tool would not write there ({listed}): "
                              "nothing was replaced; choose an empty or new folder")  # fmt: skip
    names = {e.name for e in entries}
    model_folders = ({CONFIG, WEIGHTS}, {ENTROPY_CONFIG, ENTROPY_WEIGHTS}, {TOKEN_LM_CONFIG, TOKEN_LM_WEIGHTS})
    if entries and not any(files <= names for files in model_folders):
        raise CheckpointError(f"{path} is not a model folder (no config and weights in it): "
                              "nothing was replaced; choose an empty or new folder")  # fmt: skip


def remove_stale_temps(path: Path) -> None:
    """Delete the temp folders that dead writers of `path` left beside it: atomic_dir_write's
    .NAME.tmp-PID (being written) and .NAME.old-PID (being replaced), nothing else."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)")
    for entry in path.parent.iterdir():
        found = pattern.fullmatch(entry.name)
        if not found or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(found[2])
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def verify_folder(folder: Path) -> None:
    """Every weight file, JSON file and train state in folder reads back, and there is at least
    one weight file."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"no weights (*.safetensors) in {folder}")
    for path in weights:
        for _ in iter_safetensors(path):  # one tensor in memory at a time
            pass
    for path in folder.glob("*.json"):
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if (folder / TRAIN_STATE).exists():
        read_train_state(folder, mmap=True)  # mapped: no second copy in memory


def read_train_state(folder: Path, mmap: bool = False) -> dict:
    """A training checkpoint's train_state.pt, as tensors and plain values: loaded weights_only,
    so that no code in a checkpoint ever runs."""
    path = folder / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a cut-off zip, a foreign pickle: torch raises many kinds
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is corrupt, cut short or not a train state of tensors and plain values "
                              f"({detail})") from None  # fmt: skip


def sync_files(folder: Path) -> None:
    """Flush the folder's files to disk, so that a power cut after the swap cannot leave a
    checkpoint whose files are empty."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def atomic_dir_write(path: str | Path, write, own: frozenset = MODEL_FILES, keep: Path | None = None) -> None:
    """Call write(tmp) on a temp folder beside `path`, check that its files read back, then swap
    it in: a crash or a failed write (a full disk) never leaves a half-written folder at `path`,
    and what was there survives until the new folder is complete; with `keep`, it survives as
    `keep` (the previous checkpoint) until the next swap. Only empty folders and folders of the
    tool's own files (`own`) are replaced. A failed write raises WriteError, its temp folder
    removed; so are the temp folders of writers that died."""
    path = Path(path)
    check_replaceable(path, own)
    if keep is not None:
        check_replaceable(keep, own)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        tmp.mkdir()
        try:
            write(tmp)
            sync_files(tmp)
            try:
                verify_folder(tmp)
            except CheckpointError as e:
                raise WriteError(path, f"what was written does not read back ({e})") from None
            _swap_in(tmp, path, old, keep)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already if swapped in
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:
        raise WriteError(path, e) from None


def _swap_in(tmp: Path, path: Path, old: Path, keep: Path | None) -> None:
    """tmp becomes path; the folder at path becomes keep, or old (to delete). Two renames, as
    no rename replaces a non-empty folder: if the second fails, the first is undone."""
    if not path.exists():
        tmp.rename(path)
        return
    if keep is not None and keep.exists():
        keep.rename(old)
    previous = keep if keep is not None else old
    path.rename(previous)
    try:
        tmp.rename(path)
    except OSError:
        previous.rename(path)
        raise


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def non_finite(sd: dict) -> str | None:
    """The name of the first tensor with inf or NaN values: a diverged run's weights are worth
    neither saving nor loading."""
    return next((k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _contiguous(sd: dict, dtype: torch.dtype | None = None) -> dict:
    """CPU, contiguous, finite tensors; floating ones cast to dtype if given (e.g. bf16 to ship
    small; fp16 overflows to inf beyond 65504, which is then refused)."""
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
    sd = {k: cast(v.detach()).contiguous().cpu() for k, v in sd.items()}
    bad = non_finite(sd)
    if bad is not None:
        raise CheckpointError(f"the weights to save have inf or NaN values in tensor {bad} (did training diverge?): "
                              "nothing was written")  # fmt: skip
    return sd


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


def iter_safetensors(path: Path):
    """(name, tensor) of a safetensors file, one at a time, each finite; a file missing, cut
    short, corrupt or with inf/NaN weights is a one-line CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if non_finite({name: tensor}):
                    raise CheckpointError(f"checkpoint file {path} has inf or NaN values in tensor {name}")
                yield name, tensor
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({e})") from None


def read_safetensors(path: Path) -> dict:
    return dict(iter_safetensors(path))


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


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A BLT ready to run: one of our model folders or a transformers `BltForCausalLM` folder,
    on `device`, with every parameter in ONE dtype whatever the files hold (ours may be stored
    in bf16; the published BLT checkpoints keep the hash embedding tables in float32 and the
    rest in bf16, which no matrix product takes as it is), in eval mode.

    dtype: None = float32 on every device: the engine's exactness against the full forward and
    the speeds reported for it are float32; torch.bfloat16 halves the memory (CUDA: faster)."""
    model = load_model(path, "cpu")
    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    with torch.no_grad():
        for p in model.parameters():  # parameters only: the rotary tables stay float32
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model.to(device).eval()


def _read_hf_weights(path: Path) -> dict:
    """A transformers folder's state dict: one safetensors file, shards (with or without an
    index) or pytorch_model.bin (read with weights_only=True)."""
    from safetensors.torch import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        shards = sorted(path.glob("model-*.safetensors"))
    if shards:
        sd = {}
        for shard in shards:
            sd.update(load_file(str(shard)))
        return sd
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors, sharded safetensors or pytorch_model.bin in {path}")


def load_hf_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Our BLT from a transformers BltForCausalLM folder (config.json with model_type "blt" and
    model.safetensors, or shards with model.safetensors.index.json); transformers is not needed.

    dtype: None keeps the checkpoint's dtypes (the published ones mix float32 and bf16:
    checkpoint.from_pretrained brings them to one); otherwise floating tensors are cast to it.
    A folder it cannot load is a one-line CheckpointError."""
    from blt.convert_hf import from_hf_state_dict, our_config_from_hf

    path = Path(path)
    try:
        config_file = path / CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        hf_cfg = json.loads(config_file.read_text())
        if hf_cfg.get("model_type") != "blt":
            raise ValueError(f"{config_file}: model_type is {hf_cfg.get('model_type')!r}, expected 'blt'")
        cfg = our_config_from_hf(hf_cfg)
        return from_hf_state_dict(cfg, _read_hf_weights(path), hf_cfg.get("patch_in_forward", True), device, dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        msg = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())  # one line
        raise CheckpointError(f"cannot load the transformers checkpoint in {path}: {msg}") from None
