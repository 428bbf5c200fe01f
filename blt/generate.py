"""Byte generation for BLT: `generate`, the cached loop, the plain uncached oracle, and a CLI.

    python -m blt.generate --prompt "Once upon a time" --max-new 300 --temperature 0.7 --stats

Not in the paper (BLT_LLM.md §14, incremental generation). The loop drives the KV-cached
engine, which produces, byte for byte, what `generate_uncached` produces by running
`BLT.forward` over the whole prefix for every new byte (logits equal to float noise, ~1e-6),
while running per byte only one position of the entropy model and the local encoder and
decoder, and the global model once per completed patch. Where each piece lives:

  blt/engine.py       Engine: the byte step, batched rows at their own positions, and the
                      compiled step (compile=True, CUDA: one CUDA graph that samples too)
  blt/prefill.py      the prompt into the caches in blocks (prompts of any length)
  blt/kv_cache.py     the caches: sliding-window rings, slots that record their positions
  blt/step_layers.py  layers.py's modules for one new position with cached keys/values
  blt/sampling.py     counter-based Gumbel-max sampling (a row's bytes the same in any batch)
  blt/cpu_threads.py  CPU threads, chosen while running by timing the work
  this module         the loop (sampling, stop strings, streaming, rows finishing on their
                      own), generate_uncached and the CLI

Prompts: text is encoded as BOS + UTF-8 bytes; an empty prompt generates from BOS alone.
Id lists are used as given (an empty one becomes [BOS]). There is no length limit
(blt/prefill.py). A model with document masking continues a prompt's last document, which
is all it reads (blt/engine.py); a prompt may then not end with EOS.

Rows finish independently (EOS or a stop string) and are then dropped from the batch
(compiled: they keep stepping, ignored). Compiled, the engine samples inside its graph and
the host reads each step's bytes and patch flags one step late (`pipelined`), launching step
t+1 before it waits for step t, so a row's stop is seen a step late. The sampler never emits
the ids BOE, BOS and BPE (they are not text); EOS ends a row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from blt import masks as M
from blt.cpu_threads import restored_threads
from blt.engine import Engine
from blt.entropy_model import entropy
from blt.patcher import lengths_from_starts, patch_starts
from blt.sampling import SEED_MAX, check_sampling_args, check_seed, row_seeds, sample_next
from blt.tokens import BOS_ID, EOS_ID, OFFSET, VOCAB_SIZE, StreamDecoder, encode

DEFAULT_STOP = ("<|endoftext|>",)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints"


# ---- the generation loop ----------------------------------------------------------------------


@dataclass
class GenerationStats:
    bytes: int  # bytes sampled, all rows (a stop string's bytes included, EOS not)
    seconds: float  # prefill + generation, wall clock
    bytes_per_s: float
    patches: int  # patches completed while generating, all rows (prompt patches not counted)
    global_steps: int  # one-patch global-transformer calls while generating (batched: one per call)

    def line(self) -> str:
        return (f"bytes={self.bytes} seconds={self.seconds:.4f} bytes_per_s={self.bytes_per_s:.2f} "
                f"patches={self.patches} global_steps={self.global_steps}")


@dataclass
class GenerationResult:
    ids: list[list[int]]  # generated ids per row (no EOS; a matched stop string removed)
    texts: list[str]
    stats: GenerationStats
    logits: list[torch.Tensor] | None = None  # per row (n_steps, V): logits of every sampled byte


class _Row:
    def __init__(self, stop_bytes, stream=None):
        self.out = bytearray()
        self.ids: list[int] = []
        self.done = False
        self.stop_bytes = stop_bytes
        self.stream = stream
        self.sent = 0
        self.decoder = StreamDecoder() if stream is not None else None
        self.logits: list[torch.Tensor] = []

    def push(self, tok: int) -> None:
        if tok == EOS_ID:
            self.finish()
            return
        self.ids.append(tok)
        self.out.append(tok - OFFSET)
        for s in self.stop_bytes:
            if self.out.endswith(s):
                del self.out[-len(s) :]
                del self.ids[-len(s) :]
                self.finish()
                return
        self._emit(final=False)

    def finish(self) -> None:
        self.done = True
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.stream is None:
            return
        end = len(self.out)
        if not final:  # hold back a tail that may still become a stop string
            for j in range(min(len(self.out), max((len(s) for s in self.stop_bytes), default=1) - 1), 0, -1):
                tail = bytes(self.out[-j:])
                if any(s.startswith(tail) for s in self.stop_bytes):
                    end -= j
                    break
        piece = self.decoder.push([b + OFFSET for b in self.out[self.sent : end]])
        self.sent = max(self.sent, end)
        if final:
            piece += self.decoder.flush()
        if piece:
            self.stream(piece)


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    max_new: int = 300,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop=DEFAULT_STOP,
    stream=None,
    return_logits: bool = False,
    compile: bool = False,
    threads: int | None = None,
) -> GenerationResult:
    """The cached generation loop over token-id prompts (see `generate` for the arguments).
    On KeyboardInterrupt the rows are finished first (`stream` gets every byte sampled so
    far, a held-back tail included), then it propagates."""
    check_sampling_args(max_new, temperature, top_k, top_p)
    check_seed(seed, len(prompts))
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (None: chosen while running), got {threads!r}")
    stop_bytes = _stop_bytes(stop)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        B = len(prompts)
        rows = [_Row(stop_bytes, stream if b == 0 else None) for b in range(B)]
        seeds = row_seeds(B, seed, device) if temperature > 0 else None
        eng = Engine(model, prompts, max_new, compile=compile, threads=threads)
        try:
            with restored_threads():  # the engine picks its own (ThreadChooser)
                if eng.compiled and not return_logits:
                    n_bytes = _decode_pipelined(eng, rows, max_new, (temperature, top_k, top_p), seeds)
                else:
                    n_bytes = _decode(eng, rows, max_new, (temperature, top_k, top_p), seeds, return_logits)
        finally:  # also on KeyboardInterrupt: a stream gets what was held back
            for r in rows:
                if not r.done:
                    r.finish()
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    stats = GenerationStats(n_bytes, seconds, n_bytes / seconds if seconds > 0 else 0.0, eng.patches, eng.global_steps)
    texts = [bytes(r.out).decode("utf-8", errors="replace") for r in rows]
    lg = [torch.stack(r.logits) if r.logits else torch.empty(0, VOCAB_SIZE) for r in rows] if return_logits else None
    return GenerationResult([r.ids for r in rows], texts, stats, lg)


def _push(rows, live, toks) -> int:
    """Give each live, unfinished row its sampled byte -> bytes of text added (EOS is not)."""
    n = 0
    for r, t in zip(live, toks):
        if not rows[r].done:  # compiled engines keep finished rows in the batch
            n += t != EOS_ID
            rows[r].push(t)
    return n


def _decode(eng, rows, max_new, sampling, seeds, return_logits) -> int:
    """The step-by-step loop: sample on the host's request, feed, drop finished rows."""
    live = list(range(len(rows)))  # engine row -> original row
    logits = eng.prefill() if max_new > 0 else None
    temperature, top_k, top_p = sampling
    n_bytes = 0
    for s in range(max_new):
        tok = sample_next(logits, temperature, top_k, top_p, None if seeds is None else seeds[live], s)
        if return_logits:
            for e, r in enumerate(live):
                if not rows[r].done:
                    rows[r].logits.append(logits[e].detach().float().cpu())
        n_bytes += _push(rows, live, tok.tolist())
        if s == max_new - 1:
            break
        still = [e for e, r in enumerate(live) if not rows[r].done]
        if not still:
            break
        if len(still) < len(live) and not eng.compiled:
            eng.keep(still)
            live = [live[e] for e in still]
            tok = tok[still]
        eng.active = [not rows[r].done for r in live]
        logits = timed_step(eng, tok)
    return n_bytes


def timed_step(eng, ids) -> torch.Tensor:
    """eng.step(ids); on CPU on the threads eng.choosers["step"] picks (torch.set_num_threads:
    run the loop inside restored_threads()), timing the step for it unless it completed a
    patch (those run the global model too: not comparable)."""
    if eng.device.type != "cpu":
        return eng.step(ids)
    chooser = eng.choosers["step"]
    if chooser.threads != torch.get_num_threads():
        torch.set_num_threads(chooser.threads)
    before, t0 = eng.global_steps, time.perf_counter()
    logits = eng.step(ids)
    chooser.record(time.perf_counter() - t0, comparable=eng.global_steps == before)
    return logits


class _HostCopy:
    """A step's (2,B) result on its way to the host: copied into pinned memory behind the
    step on the GPU's stream, read when the next step has been launched."""

    def __init__(self, out: torch.Tensor):
        self.event = None
        if out.is_cuda:
            self.host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.host.copy_(out, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = out.clone()

    def get(self) -> tuple[list[int], list[bool]]:
        if self.event is not None:
            self.event.synchronize()
        toks, flags = self.host.tolist()
        return toks, [bool(f) for f in flags]


def pipelined(eng, n: int):
    """Launch n sampled steps (eng.launch()); yield each one's (bytes, flags) on the host once
    the next has been launched, so the host never holds the device up. The caller passes the
    flags to eng.note() before asking for the next."""
    pending = deque()
    for _ in range(n):
        pending.append(_HostCopy(eng.launch()))
        if len(pending) > 1:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _decode_pipelined(eng, rows, max_new, sampling, seeds) -> int:
    """The compiled engine's loop: every step samples and feeds the next byte on the device
    (one CUDA graph), and the host reads the bytes one step late (pipelined()). A row's stop is
    seen a step late; the byte sampled meanwhile is dropped. The last byte is sampled without
    being fed. Same bytes as _decode."""
    if max_new == 0:
        return 0
    eng.start_sampling(eng.prefill(), *sampling, seeds)
    live = list(range(len(rows)))
    n_bytes = 0
    for toks, flags in pipelined(eng, max_new - 1):
        n_bytes += _push(rows, live, toks)
        eng.active = [not r.done for r in rows]
        eng.note(flags)
        if all(r.done for r in rows):
            return n_bytes
    temperature, top_k, top_p = sampling
    tok = sample_next(eng.logits_buf, temperature, top_k, top_p, seeds, max_new - 1)
    return n_bytes + _push(rows, live, tok.tolist())


def _stop_bytes(stop) -> list[bytes]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = (stop,)
    return [s.encode("utf-8") for s in stop if s]


def _prompt_ids(prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(i, int) for i in prompts):
        prompts = [prompts]  # one id list
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a non-empty list of strings or a list of id lists")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(encode(p))
        elif isinstance(p, (bytes, bytearray)):
            out.append(encode(bytes(p)))
        else:
            ids = [int(i) for i in p] or [BOS_ID]
            if any(not 0 <= i < VOCAB_SIZE for i in ids):
                raise ValueError(f"token ids must be in [0, {VOCAB_SIZE})")
            out.append(ids)
    return out


def generate(
    model,
    prompts,
    max_new: int = 300,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop=DEFAULT_STOP,
    stream=None,
    return_stats: bool = False,
    compile: bool = False,
    threads: int | None = None,
):
    """Continue each prompt by up to `max_new` bytes; returns the continuations (prompt not
    included), one string per prompt, or (texts, GenerationStats) with return_stats.

    prompts: a string, a list of strings (each encoded as BOS + UTF-8 bytes; "" = BOS alone)
        or a list of token-id lists (used as given).
    temperature: 0 = greedy; top_k: keep the k most likely bytes (0/None: off); top_p:
        nucleus sampling (None/1: off); seed: an integer in [0, 2**63 - rows]: row i samples
        with seed + i (reproducible, and the same bytes as that row alone; see sample_next).
    stop: strings that end a row (not returned); EOS ends a row too.
    stream: callback receiving row 0's text as it is generated, in valid UTF-8 pieces (a
        split multi-byte character, or a tail that may become a stop string, is held back).
    compile: torch.compile(mode="reduce-overhead") the per-byte step functions; CUDA only
        (ignored on other devices).
    threads: CPU threads of the prefill and the per-byte steps (None: 1 or 2, chosen while
        running by timing them: see ThreadChooser); torch's own setting is restored after.

    Prompts of any length: the prefill's time and memory grow linearly with the prompt
    (Engine.prefill), the global model's attention over every patch aside.
    """
    check_sampling_args(max_new, temperature, top_k, top_p)
    res = generate_ids(model, _prompt_ids(prompts), max_new, temperature, top_k, top_p, seed, stop, stream,
                       compile=compile, threads=threads)  # fmt: skip
    return (res.texts, res.stats) if return_stats else res.texts


@torch.no_grad()
def generate_uncached(
    model,
    prompt_ids: list[int],
    max_new: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    return_logits: bool = False,
    backend: str | None = None,
):
    """The plain oracle: for every new byte, patch and run the whole BLT over the entire
    prefix (`model.forward(tokens)`, which patches itself and sets next_starts_patch, so the
    last byte sees exactly what incremental generation sees) and take logits[:, -1].
    Sampling as `generate` for a single row (seeded `seed`). Stops at EOS (not
    returned). Returns the new ids, or (ids, (n, V) logits) with return_logits. backend: the
    forward's mask backend (None: the device's default; "dense" avoids FlexAttention compiling
    anew for every length on CUDA)."""
    check_sampling_args(max_new, temperature, top_k, top_p)
    check_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        seeds = row_seeds(1, seed, device) if temperature > 0 else None
        ids = list(prompt_ids) or [BOS_ID]
        new, all_logits = [], []
        for s in range(max_new):
            t = torch.tensor([ids], device=device)
            if backend is None:  # exactly model.forward(tokens)
                logits = model(t).logits[:, -1]
            else:  # the same, with the entropy model's mask in that backend too
                lengths, nsp = _patch(model, t, backend)
                logits = model(t, patch_lengths=lengths, next_starts_patch=nsp, backend=backend).logits[:, -1]
            if return_logits:
                all_logits.append(logits[0].float().cpu())
            t = int(sample_next(logits, temperature, top_k, top_p, seeds, s)[0])
            if t == EOS_ID:
                break
            new.append(t)
            ids.append(t)
    finally:
        model.train(was_training)
    if return_logits:
        return new, torch.stack(all_logits) if all_logits else torch.empty(0, VOCAB_SIZE)
    return new


def _patch(model, t, backend):
    """BLT.patch(t) with the entropy model's causal mask built for `backend`."""
    pc, doc_mask, H = model.cfg.patcher, model.cfg.doc_mask, None
    if pc.needs_entropy:
        em = model.entropy_model
        docs = M.document_ids(t) if doc_mask else None
        H = entropy(em(t, mask=M.causal_mask(t.shape[1], em.cfg.window, backend, t.device, docs)))
    starts = patch_starts(t, pc, H, doc_mask)
    return lengths_from_starts(starts[:, : t.shape[1]]), starts[:, t.shape[1]]


# ---- CLI --------------------------------------------------------------------------------------


def _seed_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range: use an integer in [0, 2**63 - 1]")
    return value


def _threads_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: use an integer >= 1")
    return value


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument: one line (argparse's own message, no usage block), status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="python -m blt.generate",
        description="Generate text with a BLT checkpoint. Prints prompt + continuation (UTF-8). "
        "An empty prompt generates from BOS alone. Ctrl-C prints what was generated so far "
        "and exits with status 130.",
    )
    ap.add_argument("--prompt", default="", help="text to continue (default: empty = from BOS alone)")
    ap.add_argument("--max-new", type=int, default=300, help="bytes to generate at most (default 300)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    ap.add_argument("--top-k", type=int, default=None, help="sample from the k most likely bytes")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    ap.add_argument("--seed", type=_seed_arg, default=None, help="random seed, in [0, 2**63 - 1]")
    ap.add_argument("--stop", action="append", default=None,
                    help=f"stop string (repeatable; default {DEFAULT_STOP[0]!r}); not printed")  # fmt: skip
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="model folder, ours or a transformers BltForCausalLM one "
                         "(default: checkpoints/ beside the blt package)")  # fmt: skip
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="the model's dtype (default float32; bfloat16 halves the memory)")  # fmt: skip
    ap.add_argument("--threads", type=_threads_arg, default=None,
                    help="CPU threads (default: 1 or 2, chosen while running by timing the work: "
                         "a second thread helps on idle cores and is much slower beside a busy process)")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="torch.compile the per-byte steps (CUDA only)")
    ap.add_argument("--stream", action="store_true", help="print bytes as they are generated")
    ap.add_argument("--stats", action="store_true", help="print speed statistics as the last line on stderr")
    return ap


def _stdout_gone() -> int:
    """stdout's reader went away (`generate ... | head`): point stdout at devnull, so that the
    interpreter's own flush at exit raises nothing (Python's docs, "Note on SIGPIPE"), and end
    with the status of a process that SIGPIPE ended, 128 + 13, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        check_sampling_args(args.max_new, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        ap.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available (use --device cpu)")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    try:
        return _run(args, device)
    except KeyboardInterrupt:  # before anything was generated
        return 130


def _run(args, device) -> int:
    from blt.checkpoint import CheckpointError, from_pretrained

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model = from_pretrained(args.checkpoint, device=device, dtype=DTYPES.get(args.dtype))
    except CheckpointError as e:
        default = args.checkpoint == str(DEFAULT_CHECKPOINT)
        hint = " (no model there yet: train one, or pass --checkpoint DIR)" if default else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(encoding="utf-8", errors="replace")
    prompt_bytes = os.fsencode(args.prompt)  # the exact argv bytes
    pieces = []  # without --stream, printed at the end (or on Ctrl-C)

    def emit(piece):
        if args.stream:
            out.write(piece)
            out.flush()
        else:
            pieces.append(piece)

    status, res = 0, None
    try:
        out.write(prompt_bytes.decode("utf-8", errors="replace"))
        out.flush()
        try:
            res = generate_ids(
                model, [encode(prompt_bytes)], args.max_new, args.temperature, args.top_k, args.top_p, args.seed,
                stop=DEFAULT_STOP if args.stop is None else tuple(args.stop), stream=emit, compile=args.compile,
                threads=args.threads,
            )  # fmt: skip
        except KeyboardInterrupt:  # generate_ids has streamed every byte so far
            status = 130
        out.write("".join(pieces) + "\n")
        out.flush()
    except BrokenPipeError:
        return _stdout_gone()
    if args.stats and res is not None:
        print(res.stats.line(), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
