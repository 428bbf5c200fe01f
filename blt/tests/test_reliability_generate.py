"""Generation on every path: prompts of any length (prefill in blocks), the CLI's manners
(pipes, Ctrl-C, bad values), CPU threads under load, and checkpoints in any dtype."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from blt import engine as E
from blt import generate as G
from blt import layers
from blt import masks as M
from blt import prefill as P
from blt.checkpoint import from_pretrained, save_model
from blt.cpu_threads import ThreadChooser
from blt.model import BLT
from blt.tests.test_generate import REPO, TOL, _one_thread, ckpt, make_model  # noqa: F401 (fixtures)
from blt.tokens import encode


def small_blocks(monkeypatch, chunk=7, pairs=300):
    """Prefill in blocks of at most `chunk` bytes and `pairs` query-key pairs per attention."""
    monkeypatch.setattr(P, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(P, "PREFILL_PAIRS", pairs)


def model_for(config: str, mode: str) -> BLT:
    """make_model's configs, and "full": tiny with no window anywhere (every stack causal over
    the whole prompt)."""
    model = make_model("variant" if config == "variant" else "tiny", mode, seed=3)
    if config == "full":
        c = model.cfg
        c.entropy_model.window = c.encoder.window = c.decoder.window = c.global_model.window = None
    return model


def random_prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return encode(bytes(torch.randint(32, 127, (n,), generator=g).tolist()) + "é€ and so on".encode())


# ---- 1. prompts of any length -------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, mode", [("tiny", "entropy"), ("variant", "combined"), ("variant", "space"), ("full", "monotonic")]
)
def test_prefill_in_blocks_equals_oracle(monkeypatch, config, mode):
    """A prompt prefilled in blocks of 7 bytes (and global blocks of a few patches): the same
    greedy bytes as the plain uncached oracle and as the prompt in one block, logits within
    float noise; in a batch with a short prompt too."""
    model = model_for(config, mode)
    prompt, short = random_prompt(230), encode("Hi")
    one_block = G.generate_ids(model, [prompt], 24, temperature=0.0, stop=None, return_logits=True)
    small_blocks(monkeypatch)
    res = G.generate_ids(model, [prompt, short], 24, temperature=0.0, stop=None, return_logits=True)
    ids, logits = G.generate_uncached(model, prompt, 24, return_logits=True)
    assert res.ids[0] == ids == one_block.ids[0]
    assert (res.logits[0] - logits).abs().max() < TOL
    assert (res.logits[0] - one_block.logits[0]).abs().max() < TOL
    assert res.ids[1] == G.generate_uncached(model, short, 24)


def test_prefill_never_builds_a_prompt_sized_mask(monkeypatch):
    """However long the prompt, no attention of the prefill compares more than about
    PREFILL_PAIRS query-key pairs (2x: a block's cross-attentions), and no causal mask is built
    over more than a block: memory linear in the prompt. One forward over a 1500-byte prompt
    compares 1500 x 1500."""
    model = make_model("tiny", "entropy")  # windows of 64 bytes, a global model without one
    pairs, causal = [], []
    attend, causal_mask = layers.attend, M.causal_mask

    def spy_attend(q, k, v, mask, cross=False):
        pairs.append(q.shape[2] * k.shape[2])
        return attend(q, k, v, mask, cross)

    def spy_causal(T, *args, **kwargs):
        causal.append(T)
        return causal_mask(T, *args, **kwargs)

    monkeypatch.setattr(layers, "attend", spy_attend)
    monkeypatch.setattr(M, "causal_mask", spy_causal)
    small_blocks(monkeypatch, chunk=128, pairs=128 * 192)
    prompt = random_prompt(1500)
    eng = E.Engine(model, [prompt], max_new=2)
    logits = eng.prefill()
    assert len(pairs) > 50 and max(pairs) <= 2 * P.PREFILL_PAIRS, max(pairs)
    assert not causal or max(causal) <= P.PREFILL_CHUNK
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    assert (logits[0] - ref).abs().max() < TOL


# ---- 2. the CLI's manners ----------------------------------------------------------------------


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "blt.generate", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_cli_stream_into_a_closed_pipe_ends_quietly(ckpt):
    """`generate --stream | head -c 10`: the reader goes away; generate ends at once, without a
    traceback, with the status of a process SIGPIPE ended (141)."""
    p = cli("--checkpoint", ckpt, "--prompt", "Once upon a time", "--max-new", 100000, "--stream", "--device", "cpu")
    assert p.stdout.read(10) == b"Once upon "
    p.stdout.close()  # what head does after 10 bytes
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141
    assert err == "", err


@pytest.mark.parametrize("stream", [True, False])
def test_cli_ctrl_c_prints_what_was_generated(ckpt, stream):
    """Ctrl-C while generating: the text generated so far is printed (with --stream or
    without), then a newline, no traceback, status 130. The text is what greedy generation
    gives (the stream decoder holds back nothing at the end)."""
    prompt = "Once upon a time"
    p = cli("--checkpoint", ckpt, "--prompt", prompt, "--max-new", 10**6, "--temperature", 0, "--device", "cpu",
            *(["--stream"] if stream else []))  # fmt: skip
    head = p.stdout.read(len(prompt) + (1 if stream else 0))  # the prompt is printed before generating
    assert head.startswith(prompt.encode())
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    out = (head + out).decode()
    assert p.returncode == 130 and err == b"", err.decode()
    assert out.startswith(prompt) and out.endswith("\n")
    text = out[len(prompt) : -1]
    assert len(text) >= 2
    model = from_pretrained(ckpt)
    full = G.generate(model, prompt, max_new=len(text.encode()) + 8, temperature=0)[0]
    assert full.startswith(text[:-1])  # the last character may be a split one, completed as U+FFFD


@pytest.mark.parametrize(
    "args, words",
    [
        (["--seed", str(2**70)], ["--seed", "[0, 2**63 - 1]"]),
        (["--seed", "-1"], ["--seed", "[0, 2**63 - 1]"]),
        (["--seed", "x"], ["--seed", "invalid int"]),
        (["--threads", "0"], ["--threads", ">= 1"]),
        (["--dtype", "int8"], ["--dtype", "bfloat16"]),
        (["--device", "gpu"], ["--device", "cpu"]),
        (["--max-new", "ten"], ["--max-new"]),
        (["--temperature", "nan"], ["temperature", ">= 0"]),
        (["--top-p", "2"], ["top_p", "(0, 1]"]),
    ],
)
def test_cli_bad_values_are_one_line(ckpt, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        G.main(["--checkpoint", str(ckpt), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m blt.generate: error: "), err
    assert all(w in lines[0] for w in words), lines[0]


def test_cli_unloadable_checkpoints_are_one_line(tmp_path, capsys):
    """A transformers folder without weights, or with a bad config: one line, status 1."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "blt"}))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "blt", "encoder_config": {"hidden_act": "gelu"}}))
    for folder, words in ((hf, "no model.safetensors"), (bad, "hidden_act")):
        assert G.main(["--checkpoint", str(folder), "--device", "cpu"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_library_seed_range():
    model = make_model("tiny", "byte")
    for seed in (2**70, -1, 2**63 - 1, 1.5):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 2\]"):
            G.generate(model, ["a", "b"], max_new=2, seed=seed)
    assert G.generate(model, ["a", "b"], max_new=2, seed=2**63 - 2)  # the largest two rows can take


# ---- 3. CPU threads ----------------------------------------------------------------------------


def test_thread_chooser_follows_the_load():
    """Idle (2 threads faster): it moves to 2 threads after one trial. Load comes (2 threads
    slow): one slow step starts a trial of 1 thread, which wins. Busy: trials of 2 threads stop
    after their first slow step, and become rarer."""
    ch = ThreadChooser((1, 2), every=4, trial=3, first=4)
    cost = {1: 1.0, 2: 0.8}
    log = []
    for _ in range(20):
        log.append(ch.threads)
        ch.record(cost[ch.threads])
    assert log[:4] == [1] * 4 and log[4:7] == [2] * 3 and set(log[7:]) <= {1, 2} and ch.cur == 2
    cost = {1: 1.0, 2: 6.0}  # a busy process came
    log = []
    for _ in range(200):
        log.append(ch.threads)
        ch.record(cost[ch.threads])
    assert ch.cur == 1
    slow = [i for i, n in enumerate(log) if n == 2]
    assert len(slow) <= 6, slow  # the step that showed the load, then ever rarer one-step trials
    assert all(b - a > 1 for a, b in zip(slow[1:], slow[2:]))
    ch.record(5.0, comparable=False)  # a step that also ran the global model: not timed
    assert ch.cur == 1 and ch.trying is None


def test_generate_runs_on_the_chosen_threads_and_restores(monkeypatch):
    """Steps run on the count ThreadChooser picks (threads=None) or the one given; prefill
    blocks too; torch's own setting is back afterwards."""
    model = make_model("tiny", "entropy")
    seen = {"step": [], "block": []}
    step, prefill_row = E.Engine.step, E.Engine._prefill_row

    def spy_step(self, ids):
        seen["step"].append(torch.get_num_threads())
        return step(self, ids)

    def spy_row(self, b, r):
        seen["block"].append(torch.get_num_threads())
        return prefill_row(self, b, r)

    monkeypatch.setattr(E.Engine, "step", spy_step)
    monkeypatch.setattr(E.Engine, "_prefill_row", spy_row)
    monkeypatch.setattr(E, "cores", lambda: 2)  # as the engine reads it
    torch.set_num_threads(2)
    G.generate(model, "Once", max_new=40, temperature=0)
    assert seen["step"][:8] == [1] * 8  # the fewest first, until the first trial
    assert torch.get_num_threads() == 2
    seen = {"step": [], "block": []}
    torch.set_num_threads(1)
    G.generate(model, "Once", max_new=40, temperature=0, threads=2)
    assert set(seen["step"]) == {2} and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads"):
        G.generate(model, "Once", max_new=4, threads=0)


# ---- 4. checkpoints in any dtype -------------------------------------------------------------------


def test_transformers_folder_in_published_dtypes(tmp_path):
    """A transformers BltForCausalLM folder as the 1B checkpoint is published (hash embedding
    tables float32, everything else bf16) loads in ONE dtype (float32 by default, or the one
    asked for) and generates."""
    pytest.importorskip("transformers")
    from blt.tests.test_hf_parity import _hf_model

    hf = _hf_model("A").to(torch.bfloat16)
    hf.model.encoder_hash_tok_embedding.float()
    hf.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32", "BF16"}
    for dtype in (None, torch.float32, torch.bfloat16):
        model = from_pretrained(tmp_path, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype or torch.float32}
        assert model.encoder.rope.cos_table.dtype == torch.float32
        ids = G.generate_ids(model, [encode("Hello")], 6, stop=None).ids[0]
        assert len(ids) == 6 and ids == G.generate_uncached(model, encode("Hello"), 6)


def test_our_bf16_folder_loads_in_one_dtype(tmp_path, capsys):
    """Our folders saved in bf16 load as float32 by default, or as asked; the CLI's --dtype
    gives what from_pretrained(dtype=) gives."""
    save_model(make_model("tiny", "entropy"), tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in from_pretrained(tmp_path / "m").parameters()} == {torch.float32}
    model = from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = G.generate(model, "Once", max_new=20, temperature=0)[0]
    assert G.main(["--checkpoint", str(tmp_path / "m"), "--prompt", "Once", "--max-new", "20", "--temperature", "0",
                   "--dtype", "bfloat16", "--device", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out == "Once" + want + "\n"
