"""Why and how a training run stops early: RunStopped carries the message and exit code main() reports;
GracefulStop turns SIGTERM/SIGINT into a save-then-stop agreed on by every process (one process drops the
step under way rather than finish it: StepDropped); check_bad_fraction stops a run whose corpus is too
broken to go on; injected_steps is the tests' hook for forcing NaN losses and signals. They are kept
together, apart from the rest of the run's helpers, so that every early exit and its exit code can be read
in one place; this module imports nothing else of the run's, so any module can raise RunStopped without an
import cycle."""

from __future__ import annotations

import math
import os
import random
import signal
import sys
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from whisper_ft.config import Config
from whisper_ft.data import BadCounter
from whisper_ft.exit_codes import Exit


class RunStopped(Exception):
    def __init__(self, message: str, exit_code: int = Exit.STOPPED):
        super().__init__(message)
        self.exit_code = exit_code


def injected_steps(fault: str) -> set[int]:
    """Optimizer steps (1-based) at which the tests inject a fault: WHISPER_FT_INJECT_NAN makes the loss NaN,
    WHISPER_FT_INJECT_SIGTERM has the process send itself a SIGTERM after the step's first micro-batch."""
    return {int(s) for s in os.environ.get(f"WHISPER_FT_INJECT_{fault}", "").split(",") if s.strip()}


MIN_SEEN_FOR_BAD_SHARE = 20  # below this many samples no share is judged at all
BAD_SHARE_ALPHA = 1e-4  # chance of such a share in a corpus right at the threshold: the run stops below it


def bad_share_surely_over(n_bad: int, n_seen: int, threshold: float) -> bool:
    """Whether the unusable share of a corpus is, with 99.99% confidence, above `threshold`.

    The samples seen are a random draw from the corpus, so their bad share is only an estimate: 2 bad in
    the first 24 (8%) happens often by chance in a corpus that is 4% bad. The run stops only when a corpus
    whose bad share were exactly `threshold` would show n_bad or more bad samples among n_seen with a
    probability under BAD_SHARE_ALPHA (an exact one-sided binomial test; the same as a 99.99% Clopper-
    Pearson lower bound being over the threshold), and at least MIN_SEEN_FOR_BAD_SHARE samples were seen.
    Normal approximations (Wald, Wilson) are not used: they stop small samples too easily. Checked after
    every step of 16 samples, simulated: a 4%-bad corpus with the default 5% threshold never stopped in
    4,000 runs of 9,600 samples (one right at 5% stopped in 0.15% of them); a 50%-bad corpus stopped within
    the first 48 samples, a 10%-bad one after 336 (median).
    """
    if n_seen < MIN_SEEN_FOR_BAD_SHARE or n_bad <= n_seen * threshold:
        return False
    return binomial_tail(n_bad, n_seen, threshold) < BAD_SHARE_ALPHA


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space from k up until the terms stop mattering."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    total = 0.0
    for j in range(k, n + 1):
        term = math.exp(log_n - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q)
        total += term
        if j > n * p and term < total * 1e-12:  # past the mode the terms only shrink
            break
    return min(1.0, total)


def check_bad_fraction(bad: BadCounter, cfg: Config, say, on_stop: Callable[[], None]) -> None:
    """Stop, after saving, when too many samples are unusable: the corpus itself needs fixing."""
    if not bad_share_surely_over(bad.total, bad.seen, cfg.max_bad_sample_fraction):
        return
    reason, n = bad.counts.most_common(1)[0]
    on_stop()
    raise RunStopped(f"{bad.total} of {bad.seen} samples seen ({100 * bad.total / bad.seen:.0f}%) were unusable, "
                     f"over max_bad_sample_fraction {cfg.max_bad_sample_fraction}; commonest reason: {reason} ({n}). "
                     f"First ones: {bad.first(5)}. A checkpoint was saved.", Exit.ERROR)


class StepDropped(BaseException):
    """A stop signal inside GracefulStop.droppable(): the step under way is given up. A BaseException, so that no
    `except Exception` it passes through (a sample's decoding, a data library) takes it for an error to handle."""


class GracefulStop:
    """SIGTERM/SIGINT -> save and exit, after the step under way or dropping it (droppable); a second Ctrl-C
    (SIGINT) exits at once.

    A repeated SIGTERM is not a second Ctrl-C: one `kill -TERM` to a process group, a scheduler's preemption or
    a launcher passing the signal on (accelerate 1.16's, torchrun's) deliver it to the trainer twice within
    milliseconds, and exiting on the second would lose the very checkpoint the first asked for.
    """

    def __init__(self, accelerator):
        self.accelerator, self.flag, self.on_stop = accelerator, False, lambda: None
        self.dropping = False  # inside droppable(): a signal gives the step up at once
        # Only a run of one process can drop a step (several must agree on the stop), on a CPU or GPU (whose
        # random generators _rng_states() restores)
        self.drops_steps = accelerator.num_processes == 1 and accelerator.device.type in ("cpu", "cuda")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        die_with_launcher()

    def _handle(self, signum, frame) -> None:
        if self.flag:
            if signum == signal.SIGINT:
                raise SystemExit(128 + signum)
            return  # already saving; SIGKILL is the way to end a run without a checkpoint
        self.flag = True
        when = " now (the step under way is dropped;" if self.dropping else " ("
        print(f"\nwhisper-ft: got {signal.Signals(signum).name}; saving a checkpoint{when} Ctrl-C again to exit at "
              "once)", file=sys.stderr, flush=True)
        if self.dropping:
            self.dropping = False
            raise StepDropped

    @contextmanager
    def droppable(self, enabled: bool):
        """A stop signal inside the block (or before it) raises StepDropped at once, in a run of one process on a
        CPU or GPU.

        accelerate 1.16's launcher SIGKILLs its child 5 s after passing a SIGTERM on, and finishing the step under
        way can take most of that (a large model, a loaded machine). Until the optimizer updates, the weights and
        the optimizer are still the last step's; the block's other effects, the random generators and accelerate's
        accumulation counter, are put back here, and the caller saves the data position it took before the step,
        so the checkpoint is the one the last step would have saved (DESIGN: a stop signal)."""
        accelerator = self.accelerator
        if not (enabled and self.drops_steps):
            yield
            return
        before = _rng_states(), accelerator.step
        self.dropping = True
        try:
            if self.flag:  # signalled between the last step's check and here
                raise StepDropped
            yield
        except StepDropped:
            _set_rng_states(before[0])
            accelerator.step = before[1]
            raise
        finally:
            self.dropping = False

    def requested(self) -> bool:
        return self.flag

    def agreed(self) -> bool:
        """True on every process when any process was signalled (one process: no GPU round trip)."""
        if self.accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor(int(self.flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max"))

    def check(self, step: int, anywhere: bool) -> None:
        """Save and stop after `step` when `anywhere`: whether any process was signalled, as every process learnt
        it from the step's totals (batches.step_totals) rather than from a collective of its own. One process needs
        no agreement: it stops after the step under way, not the one after, as accelerate 1.16's launcher kills it
        5 s after passing a SIGTERM on."""
        if anywhere or (self.flag and self.accelerator.num_processes == 1):
            self.on_stop()
            raise RunStopped(f"stopped by signal at step {step}; checkpoint saved. Rerun the same command to resume.")


def _rng_states() -> tuple:
    """What accelerate's save_state stores of the random generators (CPU and CUDA: where droppable() applies)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_states(states: tuple) -> None:
    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def die_with_launcher() -> None:
    """Under `accelerate launch` with one process, stop (saving) when the launcher dies.

    accelerate's one-process launcher runs the trainer as its child. Before 1.16 a SIGTERM to the launcher
    (what Kubernetes and many schedulers send to the job's first process) killed the launcher alone and the
    trainer trained on unseen until the SIGKILL that follows; 1.16 passes SIGTERM on itself (and SIGKILLs
    5 s later). Asking the kernel for a SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG) makes every
    version stop with a checkpoint. Only for that launcher: a shell or nohup parent may exit on purpose.
    """
    if not sys.platform.startswith("linux") or "LOCAL_RANK" in os.environ:  # torchrun's agent stops its workers
        return
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return
    if not any(a.endswith(b"accelerate") for a in args[:2]) or b"launch" not in args:
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
