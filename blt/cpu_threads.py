"""CPU threads of generation: how many, chosen while running by timing the work.

An engineering concern, not in the paper (BLT_LLM.md §14, "On a CPU"). A byte step on CPU is
bound by memory bandwidth and per-call overhead, and the step helpers (blt/step_layers.py)
split every product across the threads. How many threads: 1 or up to MAX_AUTO_THREADS,
chosen while running by timing the work (ThreadChooser): a second thread is faster on idle
cores and many times slower beside another busy process. cpu_threads and restored_threads
set torch's thread count for a piece of work and put the caller's back after it.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from contextlib import contextmanager

import torch

# The most CPU threads the engine gives its work on its own (ThreadChooser picks 1 or this
# many, capped by the cores; Engine(threads=N) fixes N).
MAX_AUTO_THREADS = 2


@contextmanager
def restored_threads():
    """torch's thread count, whatever the body sets, restored after it."""
    old = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@contextmanager
def cpu_threads(n: int | None):
    """torch.set_num_threads(n) for the duration (None: leave it)."""
    with restored_threads():
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
        yield


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ThreadChooser:
    """Picks the CPU threads of a repeated piece of work (a byte step, a prefill block) by
    timing it while it runs, as the machine's load comes and goes. The per-byte step is
    hundreds of small products: on 2 idle cores a second thread makes it ~15% faster, beside
    one busy process 5-60x slower (each product waits for the thread the OS has descheduled;
    bench/generate_speed.py --cpu-load); the prefill's large products gain more on idle cores
    and lose as much beside a busy process.

    It starts on the fewest threads (never the slow choice) and tries the other after `first`
    units of work, then every `every` units: for `trial` of them, and keeps it if their median time beats the
    current choice's (its last `trial` timings) by 5%. A trial stops at once on a unit over
    1.5x the current median; a lost trial makes `every` 4x longer (up to 64x), a won one
    resets it: beside a busy process, trials of more threads soon become rare.
    On more than the fewest threads, a unit over 2x the median (load came) starts a trial of
    the fewest at once. Timings: seconds per unit of work, given by the caller to record()."""

    def __init__(self, choices, every: int = 32, trial: int = 8, first: int = 8):
        self.choices = sorted(set(choices))
        self.cur = self.choices[0]
        self.base_every = self.every = every
        self.countdown = first
        self.trial_len = trial
        self.times = {n: deque(maxlen=trial) for n in self.choices}
        self.trying, self.trial_times = None, []

    @property
    def threads(self) -> int:
        return self.trying or self.cur

    def record(self, seconds: float, comparable: bool = True) -> None:
        """One unit of work took `seconds` on self.threads threads; comparable=False: a unit
        unlike the others (e.g. a step that also ran the global model), not timed."""
        if self.trying is None:
            if not comparable:
                return
            cur = self.times[self.cur]
            load_came = self.cur != self.choices[0] and len(cur) > 0 and seconds > 2 * statistics.median(cur)
            cur.append(seconds)
            self.countdown -= 1
            if len(self.choices) > 1 and (self.countdown <= 0 or load_came):
                self.trying = self.choices[0] if self.cur != self.choices[0] else self.choices[-1]
                self.trial_times = []
            return
        if not comparable:
            return
        base = statistics.median(self.times[self.cur])
        self.trial_times.append(seconds)
        if seconds > 1.5 * base:
            won = False
        elif len(self.trial_times) >= self.trial_len:
            won = statistics.median(self.trial_times) < 0.95 * base
        else:
            return
        if won:
            self.times[self.trying].extend(self.trial_times)
            self.cur, self.every = self.trying, self.base_every
        else:
            self.every = min(4 * self.every, 64 * self.base_every)
        self.trying, self.countdown = None, self.every
