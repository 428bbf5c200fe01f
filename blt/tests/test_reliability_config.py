"""Saved configs are complete and valid, or refused with one line naming the key.

`BLTConfig.from_dict` / `from_json`, `entropy_config_from_dict` and `load_json` read what
`to_json` and the checkpoint writers saved; `blt.train --config FILE.json` and
`blt.train_entropy --config FILE.json` go through them.
"""

import json
import math
import re
from pathlib import Path

import pytest

from blt import train, train_entropy
from blt.checkpoint import CheckpointError, load_entropy_model, load_model
from blt.config import (
    ADDED_LATER,
    PRESETS,
    BLTConfig,
    ConfigError,
    PatcherConfig,
    entropy_config_from_dict,
    load_json,
    preset,
    tiny,
)

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints"


def leaf_keys(d: dict, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf of a nested dict."""
    keys = []
    for key, value in d.items():
        keys += leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def edited(d: dict, dotted: str, value=None, delete: bool = False) -> dict:
    """A deep copy of `d` with one dotted key set to `value` (or deleted)."""
    d = json.loads(json.dumps(d))
    *parents, last = dotted.split(".")
    node = d
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return d


def refused(d, message: str, tmp_path: Path) -> None:
    """from_dict and from_json both refuse `d` with a one-line ConfigError containing `message`;
    from_json's names the file."""
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        BLTConfig.from_dict(d)
    assert "\n" not in str(info.value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        BLTConfig.from_json(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_shipped_checkpoint_config_has_every_key():
    """Every key but those added after it was saved, which read as what the file meant."""
    raw = json.loads((CHECKPOINT / "config.json").read_text())
    cfg = BLTConfig.from_json(CHECKPOINT / "config.json")
    assert cfg.to_dict() == {**raw, **ADDED_LATER} and not cfg.doc_mask  # trained without document masking
    assert sorted(leaf_keys(raw) + list(ADDED_LATER)) == sorted(leaf_keys(tiny().to_dict()))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_strictly(name, tmp_path):
    cfg = preset(name)
    cfg.to_json(tmp_path / "c.json")
    assert BLTConfig.from_json(tmp_path / "c.json") == cfg


def test_every_missing_key_is_named(tmp_path):
    full = tiny().to_dict()
    keys = [key for key in leaf_keys(full) if key not in ADDED_LATER] + ["patcher", "encoder"]
    assert "patcher.threshold" in keys and "encoder.ngram_sizes" in keys
    for key in keys:
        d = edited(full, key, delete=True)
        with pytest.raises(ConfigError, match=f"^missing key {re.escape(key)}$"):
            BLTConfig.from_dict(d)
    refused(edited(full, "patcher.threshold", delete=True), "missing key patcher.threshold", tmp_path)
    with pytest.raises(ConfigError, match=r"^\S*config\.json: missing key patcher\.threshold$"):
        BLTConfig.from_json(tmp_path / "config.json")  # the file `refused` wrote
    with pytest.raises(ConfigError, match="^missing keys patcher.threshold, patcher.threshold_add$"):
        BLTConfig.from_dict(edited(edited(full, "patcher.threshold", delete=True), "patcher.threshold_add", delete=True))


@pytest.mark.parametrize("key", ["bogus", "patcher.bogus", "encoder.dimension", "global_model.head_dim"])
def test_unknown_keys_are_named(key, tmp_path):
    refused(edited(tiny().to_dict(), key, 1), f"unknown key {key}", tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("encoder.dim", "32", 'encoder.dim must be an integer, got "32"'),
        ("encoder.dim", 32.0, "encoder.dim must be an integer, got 32.0"),
        ("encoder.dim", True, "encoder.dim must be an integer, got true"),
        ("cross_attn_k", None, "cross_attn_k must be an integer, got null"),
        ("decoder.window", 64.5, "decoder.window must be an integer or null, got 64.5"),
        ("patcher.threshold", "high", 'patcher.threshold must be a finite number, got "high"'),
        ("patcher.threshold", None, "patcher.threshold must be a finite number, got null"),
        ("patcher.threshold", math.nan, "patcher.threshold must be a finite number, got NaN"),
        ("entropy_model.rope_theta", math.inf, "entropy_model.rope_theta must be a finite number, got Infinity"),
        ("patcher.mode", 1, "patcher.mode must be a string, got 1"),
        ("hash_embed_mean", 1, "hash_embed_mean must be true or false, got 1"),
        ("encoder.ngram_sizes", [3, "4"], 'encoder.ngram_sizes must be a list of integers, got [3, "4"]'),
        ("encoder.ngram_sizes", [3, True], "encoder.ngram_sizes must be a list of integers, got [3, true]"),
        ("patcher", [1], "patcher must be a JSON object, got a list"),
    ],
)
def test_wrong_types_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        BLTConfig.from_dict(edited(tiny().to_dict(), key, value))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("entropy_model.dim", 0, "entropy_model: dim, n_layers and n_heads must be positive"),
        ("global_model.ffn_hidden", 0, "global_model: ffn_hidden must be >= 1 or null"),
        ("encoder.window", 0, "encoder: window must be >= 1 or null"),
        ("decoder.dropout", 1.0, "decoder: dropout must be in [0, 1)"),
        ("decoder.dropout", -0.1, "decoder: dropout must be in [0, 1)"),
        ("decoder.norm_eps", 0.0, "decoder: norm_eps must be a finite number > 0"),
        ("global_model.rope_theta", -1.0, "global_model: rope_theta must be a finite number > 0"),
        ("encoder.cross_attn_window", 0, "encoder.cross_attn_window must be >= 1 or null"),
        ("decoder.cross_attn_window", -2, "decoder.cross_attn_window must be >= 1 or null"),
        ("patcher.patch_size", 0, "patcher.patch_size must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused(key, value, message, tmp_path):
    refused(edited(tiny().to_dict(), key, value), message, tmp_path)


def test_non_finite_values_are_refused_in_files_and_in_code(tmp_path):
    path = tmp_path / "config.json"
    for literal in ("NaN", "Infinity", "-Infinity"):
        path.write_text(json.dumps(tiny().to_dict()).replace('"threshold": 1.5', f'"threshold": {literal}'))
        with pytest.raises(ConfigError, match=f"is not valid JSON .*{literal} is not a JSON number"):
            BLTConfig.from_json(path)
    cfg = tiny()
    cfg.patcher.threshold = math.nan  # programmatic construction is validated as well
    with pytest.raises(ConfigError, match="patcher.threshold must be a finite number, got nan"):
        cfg.validate()
    with pytest.raises(ConfigError, match="patcher.threshold_add must be a finite number"):
        BLTConfig(patcher=PatcherConfig(threshold_add=math.inf)).validate()


@pytest.mark.parametrize(("text", "kind"), [("[1, 2]", "a list"), ('"tiny"', "a string"), ("3", "a number"),
                                             ("null", "null")])  # fmt: skip
def test_a_config_that_is_not_an_object_is_refused(text, kind, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^config file {re.escape(str(path))} must hold a JSON object, got {kind}$"):
        BLTConfig.from_json(path)
    with pytest.raises(ConfigError, match=f"^the config must be a JSON object, got {kind}$"):
        BLTConfig.from_dict(json.loads(text))
    # a checkpoint folder whose config.json is not an object: a CheckpointError, not an AttributeError
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        load_model(tmp_path)


def test_checkpoint_with_an_incomplete_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(edited(tiny().to_dict(), "patcher.threshold", delete=True)))
    with pytest.raises(CheckpointError, match=r"config\.json: missing key patcher\.threshold$"):
        load_model(tmp_path)


def test_integers_are_accepted_for_float_fields():
    cfg = BLTConfig.from_dict(edited(edited(tiny().to_dict(), "patcher.threshold", 2), "decoder.dropout", 0))
    assert cfg.patcher.threshold == 2.0 and isinstance(cfg.patcher.threshold, float)
    assert isinstance(cfg.decoder.dropout, float)


def test_entropy_model_config_is_strict(tmp_path):
    full = tiny().entropy_model.__dict__
    assert entropy_config_from_dict(dict(full)) == tiny().entropy_model
    cases = [
        (edited(full, "rope_theta", delete=True), "missing key rope_theta"),
        (edited(full, "depth", 3), "unknown key depth"),
        (edited(full, "window", "64"), 'window must be an integer or null, got "64"'),
        (edited(full, "norm_eps", math.nan), "norm_eps must be a finite number, got NaN"),
        (edited(full, "n_heads", 3), "entropy_model: dim 32 is not divisible by n_heads 3"),
        ([full], "the config must be a JSON object, got a list"),
    ]
    for d, message in cases:
        with pytest.raises(ConfigError, match=f"^entropy model config: {re.escape(message)}$"):
            entropy_config_from_dict(d)
    (tmp_path / "entropy_config.json").write_text(json.dumps(cases[0][0]))
    with pytest.raises(CheckpointError, match="missing key rope_theta"):
        load_entropy_model(tmp_path)


def test_load_json_refuses_non_objects_and_constants(tmp_path):
    path = tmp_path / "threshold.json"
    path.write_text('{"mode": "entropy", "threshold": NaN}')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_json(path, "threshold")
    path.write_text('[{"mode": "entropy"}]')
    with pytest.raises(ConfigError, match="must hold a JSON object, got a list"):
        load_json(path, "threshold")


def test_train_config_file_is_strict(tmp_path, capsys):
    """`blt.train --config FILE.json` and `blt.train_entropy --config FILE.json`: one-line usage errors."""
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(edited(tiny().to_dict(), "patcher.threshold", delete=True)))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(f"{path}: missing key patcher.threshold") and "Traceback" not in err

    path.write_text(json.dumps(edited(tiny().entropy_model.__dict__, "window", delete=True)))
    with pytest.raises(SystemExit) as exit_info:
        train_entropy.main(["--config", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("entropy model config: missing key window")
