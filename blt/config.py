"""Configuration dataclasses, one per BLT component (paper §3), composed into `BLTConfig`.

Every field is explicit and JSON-serialisable; `BLTConfig.to_json` / `from_json` round-trip
exactly. Presets are plain functions selected by name in `PRESETS`.

A saved config is read strictly (`BLTConfig.from_dict`, `entropy_config_from_dict`): every
field of every component must be present, no unknown key, each value of its field's JSON
type, numbers finite, and the whole must pass `validate`. Anything else is a one-line
ConfigError naming the dotted key. A missing key never takes the dataclass default: the
default can describe a different model (a missing `patcher.threshold` would patch with the
HF port's 1.335 instead of the calibrated value). A field added after the first saved
config comes with the value that reproduces what older files meant without it, given
explicitly where the file is read (`ADDED_LATER`), not taken from the dataclass default: so
every config this project wrote loads, as the model it was.
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from blt.tokens import VOCAB_SIZE

PATCH_MODES = ("entropy", "monotonic", "combined", "static", "space", "byte")


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


def _ffn_hidden(dim: int) -> int:
    # SwiGLU width 8/3·d, the HF port's default. The official code rounds it up to a multiple
    # of 256 (`multiple_of`), which is how the released shapes were made (2048, 2816, 5632);
    # presets that follow it say so with ffn_hidden.
    return int(8 * dim / 3)


@dataclass
class TransformerConfig:
    """A stack of pre-norm transformer layers (RMSNorm, RoPE attention, SwiGLU)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    ffn_hidden: int | None = None  # None = int(8/3 · dim)
    window: int | None = None  # sliding-window size in positions (self included); None = full causal
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or _ffn_hidden(self.dim)

    def validate(self, name: str) -> None:
        if self.dim <= 0 or self.n_layers < 0 or self.n_heads <= 0:
            raise ConfigError(f"{name}: dim, n_layers and n_heads must be positive")
        if self.dim % self.n_heads:
            raise ConfigError(f"{name}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{name}: head_dim {self.head_dim} must be even for RoPE")
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ConfigError(f"{name}: n_kv_heads must be >= 1 or null")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"{name}: n_heads {self.n_heads} not divisible by n_kv_heads {self.kv_heads}")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ConfigError(f"{name}: ffn_hidden must be >= 1 or null")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{name}: window must be >= 1 or null")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{name}: dropout must be in [0, 1)")
        for key in ("rope_theta", "norm_eps"):
            if not 0.0 < getattr(self, key) < math.inf:
                raise ConfigError(f"{name}: {key} must be a finite number > 0, got {getattr(self, key)}")


@dataclass
class EntropyModelConfig(TransformerConfig):
    """The small byte LM whose next-byte entropy places patch boundaries (paper §2.3)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    window: int | None = 512
    rope_theta: float = 10000.0  # the official entropy model (and the HF port's patcher) use 1e4


@dataclass
class PatcherConfig:
    """How bytes are grouped into patches (paper §2).

    mode: entropy   -- byte t opens a patch when H(x_t | x_<t) > threshold (global rule, eq. 2)
          monotonic -- when H_t - H_{t-1} > threshold (approximate monotonic rule, eq. 3)
          combined  -- when both H_t > threshold and H_t - H_{t-1} > threshold_add
          static    -- every `patch_size` bytes (after BOS)
          space     -- a patch opens after the first space-like byte that follows a word (see patcher.py)
          byte      -- every byte is a patch
    """

    mode: str = "entropy"
    threshold: float = 1.335442066192627  # the HF port's default; calibrate with patcher.calibrate_threshold
    threshold_add: float = 0.0
    patch_size: int = 4
    max_patch_length: int | None = None

    def validate(self) -> None:
        if self.mode not in PATCH_MODES:
            raise ConfigError(f"patcher.mode must be one of {PATCH_MODES}, got {self.mode!r}")
        if self.patch_size < 1:
            raise ConfigError("patcher.patch_size must be >= 1")
        if self.max_patch_length is not None and self.max_patch_length < 1:
            raise ConfigError("patcher.max_patch_length must be >= 1 or null")
        for key in ("threshold", "threshold_add"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"patcher.{key} must be a finite number, got {getattr(self, key)}")

    @property
    def needs_entropy(self) -> bool:
        return self.mode in ("entropy", "monotonic", "combined")


@dataclass
class LocalEncoderConfig(TransformerConfig):
    """Byte-level encoder: windowed byte attention + hash n-grams + cross-attention pooling (§3.2)."""

    dim: int = 384
    n_layers: int = 1
    n_heads: int = 6
    window: int | None = 512
    ngram_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    hash_rows: int = 50002  # rows per (hash function, n) table
    hash_functions: int = 1
    cross_attn_all_layers: bool = False  # False: one cross-attention after the last layer
    cross_attn_window: int | None = None  # None: a patch query sees only its own bytes


@dataclass
class GlobalConfig(TransformerConfig):
    """The latent transformer, causal over patches (§3.1)."""

    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    window: int | None = None


@dataclass
class LocalDecoderConfig(TransformerConfig):
    """Byte-level decoder: cross-attends from bytes to patch outputs, predicts the next byte (§3.3)."""

    dim: int = 384
    n_layers: int = 4
    n_heads: int = 6
    window: int | None = 512
    cross_attn_all_layers: bool = True  # False: only before the first layer
    cross_attn_window: int | None = None  # None: a byte sees only its latest complete patch


@dataclass
class BLTConfig:
    entropy_model: EntropyModelConfig = field(default_factory=EntropyModelConfig)
    patcher: PatcherConfig = field(default_factory=PatcherConfig)
    encoder: LocalEncoderConfig = field(default_factory=LocalEncoderConfig)
    global_model: GlobalConfig = field(default_factory=GlobalConfig)
    decoder: LocalDecoderConfig = field(default_factory=LocalDecoderConfig)
    cross_attn_k: int = 2  # queries (encoder) / keys (decoder) per patch
    vocab_size: int = VOCAB_SIZE
    # Where the released weights and the HF port differ from the paper (BLT_LLM.md, deviations):
    cross_attn_double_residual: bool = False  # True: x + (x + attn(x)), as the released code
    hash_embed_mean: bool = True  # True: paper eq. 6 divides the sum by (#tables + 1); code: plain sum
    # Document masking (BLT_LLM.md §8.1): no attention, patch or hash n-gram crosses the end of a
    # document (an EOS) in a packed window, as the official training's block-causal masks.
    # On for new configs; configs saved before the field existed read False (ADDED_LATER).
    doc_mask: bool = True

    def validate(self) -> "BLTConfig":
        self.entropy_model.validate("entropy_model")
        self.patcher.validate()
        self.encoder.validate("encoder")
        self.global_model.validate("global_model")
        self.decoder.validate("decoder")
        if self.cross_attn_k < 1:
            raise ConfigError("cross_attn_k must be >= 1")
        if self.vocab_size != VOCAB_SIZE:
            raise ConfigError(f"vocab_size must be {VOCAB_SIZE} (256 bytes + 4 special ids)")
        if not self.encoder.ngram_sizes or min(self.encoder.ngram_sizes) < 1:
            raise ConfigError("encoder.ngram_sizes must be a non-empty list of positive sizes")
        if self.encoder.hash_rows < 1 or self.encoder.hash_functions < 1:
            raise ConfigError("encoder.hash_rows and encoder.hash_functions must be >= 1")
        if self.encoder.dim != self.decoder.dim:
            raise ConfigError(f"encoder.dim {self.encoder.dim} must equal decoder.dim {self.decoder.dim}: "
                              "the decoder reads the encoder's byte states")
        if self.encoder.n_layers < 1 or self.decoder.n_layers < 1:
            raise ConfigError("encoder and decoder need at least one layer")
        for name, window in (("encoder", self.encoder.cross_attn_window), ("decoder", self.decoder.cross_attn_window)):
            if window is not None and window < 1:
                raise ConfigError(f"{name}.cross_attn_window must be >= 1 or null")
        return self

    @property
    def global_input_dim(self) -> int:
        """Width of a pooled patch (k queries of the encoder's width)."""
        return self.cross_attn_k * self.encoder.dim

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BLTConfig":
        """A saved config, read strictly (see the module docstring)."""
        return _strict(cls, d, "").validate()

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "BLTConfig":
        raw = load_json(path, "config")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# Fields added after the first saved config -> the value that reproduces what a file without
# them meant. A missing key of any other field is an error.
ADDED_LATER = {"doc_mask": False}

_JSON_TYPES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
               list[int]: "a list of integers", type(None): "null"}  # fmt: skip


def _strict(klass, d, prefix: str):
    """Build dataclass `klass` from a JSON object holding exactly its fields (nested for
    dataclass-typed fields; a BLTConfig's ADDED_LATER fields may be missing). `prefix` is the
    dotted path of `d`, for the messages."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix[:-1] or 'the config'} must be a JSON object, got {_json_name(d)}")
    if klass is BLTConfig:
        d = {**ADDED_LATER, **d}
    hints = typing.get_type_hints(klass)
    names = [f.name for f in dataclasses.fields(klass)]
    unknown = [prefix + k for k in d if k not in hints]
    if unknown:
        raise ConfigError(f"unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
    missing = [prefix + k for k in names if k not in d]
    if missing:
        raise ConfigError(f"missing key{'s' * (len(missing) > 1)} {', '.join(missing)}")
    kwargs = {}
    for name in names:
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _strict(hints[name], d[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _typed(d[name], hints[name], prefix + name)
    return klass(**kwargs)


def _typed(value, annotation, key: str):
    """A JSON value checked against a field annotation (bool, int, float, str, list[int], X | None);
    an integer given for a float field becomes a float."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for t in options:
        if t is type(None) and value is None:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if t == list[int] and isinstance(value, list) and all(type(v) is int for v in value):
            return list(value)
    expected = " or ".join(_JSON_TYPES[t] for t in options)
    raise ConfigError(f"{key} must be {expected}, got {json.dumps(value, default=repr)}")


def _json_name(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def entropy_config_from_dict(d: dict) -> EntropyModelConfig:
    """A saved entropy model config (`entropy_config.json`), read as strictly as `BLTConfig.from_dict`."""
    try:
        cfg = _strict(EntropyModelConfig, d, "")
        cfg.validate("entropy_model")
    except ConfigError as e:
        raise ConfigError(f"entropy model config: {e}") from None
    return cfg


def load_json(path: str | Path, what: str) -> dict:
    """Read a JSON object from a file or raise a one-line ConfigError naming the problem.
    NaN and Infinity, which Python's json accepts but JSON does not, are refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        value = json.loads(path.read_text(), parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN or Infinity
        raise ConfigError(f"{what} file {path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} file {path} must hold a JSON object, got {_json_name(value)}")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ---- presets ----------------------------------------------------------------------------


def tiny() -> BLTConfig:
    """Seconds-fast shapes for tests."""
    return BLTConfig(
        entropy_model=EntropyModelConfig(dim=32, n_layers=2, n_heads=2, window=64),
        patcher=PatcherConfig(mode="entropy", threshold=1.5, max_patch_length=8),
        encoder=LocalEncoderConfig(dim=32, n_layers=1, n_heads=2, window=64, hash_rows=257),
        global_model=GlobalConfig(dim=64, n_layers=2, n_heads=4),
        decoder=LocalDecoderConfig(dim=32, n_layers=2, n_heads=2, window=64),
        cross_attn_k=2,
    ).validate()


def bench() -> BLTConfig:
    """The shape the speed benchmarks compare against transformers' BltForCausalLM. Feed-forward
    widths as the official code rounds them (multiple of 256): 8/3·256 = 682 -> 768."""
    return BLTConfig(
        entropy_model=EntropyModelConfig(dim=256, n_layers=4, n_heads=4, window=512, ffn_hidden=768),
        patcher=PatcherConfig(mode="entropy"),
        encoder=LocalEncoderConfig(dim=384, n_layers=1, n_heads=6, window=512, hash_rows=50002),
        global_model=GlobalConfig(dim=768, n_layers=6, n_heads=12),
        decoder=LocalDecoderConfig(dim=384, n_layers=4, n_heads=6, window=512),
        cross_attn_k=2,
    ).validate()


def blt_1b() -> BLTConfig:
    """The released 1B shape (facebook/blt-1b); flags set as the released weights need."""
    return BLTConfig(
        entropy_model=EntropyModelConfig(dim=768, n_layers=14, n_heads=12, window=512, ffn_hidden=2048),
        patcher=PatcherConfig(mode="entropy"),
        encoder=LocalEncoderConfig(dim=1024, n_layers=1, n_heads=16, window=512, hash_rows=500002),
        global_model=GlobalConfig(dim=2048, n_layers=25, n_heads=16, ffn_hidden=5632),
        decoder=LocalDecoderConfig(dim=1024, n_layers=9, n_heads=16, window=512, ffn_hidden=2816),
        cross_attn_k=2,
        cross_attn_double_residual=True,
        hash_embed_mean=False,
    ).validate()


def tinystories() -> BLTConfig:
    """The shape shipped for TinyStories: small enough to train on a 6 GB GPU, to ship in
    under 64 MiB (bf16 weights, entropy model included) and to sample over 200 bytes/s on a
    2-core CPU, where one byte step reads every per-byte weight from memory: the entropy model
    and the global depth were trimmed for that. k·d_encoder = 2·256 = d_global, so there is no
    projection into the global model."""
    return BLTConfig(
        entropy_model=EntropyModelConfig(dim=128, n_layers=2, n_heads=2, window=512),
        patcher=PatcherConfig(mode="entropy"),
        encoder=LocalEncoderConfig(dim=256, n_layers=1, n_heads=4, window=512, ngram_sizes=[3, 4, 5, 6, 7, 8], hash_rows=3079),
        global_model=GlobalConfig(dim=512, n_layers=5, n_heads=8),
        decoder=LocalDecoderConfig(dim=256, n_layers=4, n_heads=4, window=512),
        cross_attn_k=2,
    ).validate()


PRESETS = {"tiny": tiny, "bench": bench, "blt-1b": blt_1b, "tinystories": tinystories}


def preset(name: str) -> BLTConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
