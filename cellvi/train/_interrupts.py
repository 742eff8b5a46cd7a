"""Ctrl-C and a scheduler's SIGTERM stop training at the next step boundary, not mid-call.

A signal handler that raises at once lands wherever the main thread happens to be: inside
``inspect``, a data loader or an optimizer step, where library code may catch it as an
ordinary exception and turn it into something else (``inspect.getfullargspec`` reports
``TypeError('unsupported callable')``). So the first signal is only recorded; a callback raises
:class:`TrainingInterrupted` at the next batch boundary, where the weights are consistent. A
second signal raises at once, for a run that is stuck inside one call.

Several processes (DDP): a scheduler signals every process of the job, Ctrl-C the whole
foreground group, and the launching process of ``ddp_spawn``/``ddp_notebook`` forwards what it
gets to its workers, so a worker may see one event twice; only the process that entered the
guard, at rank 0, treats a second signal as "stop now". Every few steps the ranks agree (one
small all-reduce) whether any got a signal, so all stop at the same step; a rank that
stopped alone would leave the others waiting in a collective. The guard replaces Lightning's
own SIGTERM handler in each process when training starts: Lightning's stop exits spawned
workers without a result, and the launching process then waits for it forever.
"""

from __future__ import annotations

import os
import re
import signal
import threading

import lightning.pytorch as pl

from ..errors import TrainingError

__all__ = ["TrainingInterrupted", "InterruptGuard"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# ranks agree on a stop every this many optimizer steps: one all-reduce of a flag costs about
# 0.35 ms over gloo on a 2-core machine, a few percent of a small step if done at every step
DDP_CHECK_EVERY = 8
_WORKER_INTERRUPTION = re.compile(r"TrainingInterrupted: (Training was interrupted by [^\n]*)")


class TrainingInterrupted(TrainingError):
    """Training was stopped by Ctrl-C (SIGINT) or a scheduler's SIGTERM."""

    @property
    def signum(self) -> int:
        """The signal that stopped training (SIGINT unless the message names SIGTERM: the
        message is all that comes back from a worker process)."""
        return signal.SIGTERM if "SIGTERM" in str(self) else signal.SIGINT


class InterruptGuard(pl.Callback):
    """Owns the SIGINT/SIGTERM handlers while a fit runs (``with guard:``) and raises
    :class:`TrainingInterrupted` at the first batch boundary after a signal.

    Lightning answers Ctrl-C with ``sys.exit``; raising our own exception instead lets the
    runner keep weights and history and say how to resume. Outside the main thread (where
    handlers cannot be installed) the guard does nothing.
    """

    def __init__(self) -> None:
        self.pending: str | None = None
        self.trainer: pl.Trainer | None = None  # set by the runner: ranks and launcher
        self._previous: dict = {}
        self._owner: int | None = None

    def __getstate__(self) -> dict:  # spawned workers get a copy without handlers or trainer
        return {**self.__dict__, "trainer": None, "_previous": {}}

    def _may_force(self) -> bool:
        """Whether a second signal here can only mean the user insisted."""
        rank0 = self.trainer is None or self.trainer.global_rank == 0
        return os.getpid() == self._owner and rank0

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.pending is not None and self._may_force():
            raise TrainingInterrupted(f"Training was interrupted by {name} (sent twice).")
        if self.pending is None:
            self.pending = name
            self._forward(signum)

    def _forward(self, signum) -> None:
        """The launching process of spawned/forked workers passes the signal on to them."""
        try:
            from lightning.pytorch.strategies.launchers.multiprocessing import (
                _MultiProcessingLauncher,
            )
        except ImportError:  # a Lightning without it: the workers get signals of their own
            return
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        if os.getpid() == self._owner and isinstance(launcher, _MultiProcessingLauncher):
            launcher.kill(signum)

    def check(self, trainer: pl.Trainer | None = None) -> None:
        """Raise :class:`TrainingInterrupted` if a signal arrived since the guard started; with
        several ranks, if one arrived at any rank (a collective: call it on all ranks)."""
        if trainer is not None and trainer.world_size > 1:
            if trainer.global_step % DDP_CHECK_EVERY:  # the same steps on every rank
                return
            here = self.pending is not None
            if not trainer.strategy.reduce_boolean_decision(here, all=False):
                return
            raise TrainingInterrupted(
                f"Training was interrupted by {self.pending or 'a signal to another rank'}."
            )
        if self.pending is not None:
            raise TrainingInterrupted(f"Training was interrupted by {self.pending}.")

    def as_interruption(self, exc: BaseException) -> BaseException:
        """What a fit that raised ``exc`` reports: after a signal here, whatever came out of it
        is an interruption; so is a spawned or forked worker's interruption (torch passes it
        on as a ``ProcessRaisedException`` holding the worker's traceback as text)."""
        if isinstance(exc, TrainingInterrupted):
            return exc
        if self.pending is not None:
            return TrainingInterrupted(f"Training was interrupted by {self.pending}.")
        if isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt):
            # Lightning answers a KeyboardInterrupt raised in training code (a callback, a
            # data loader) with sys.exit(1), which would end a script without a word
            interrupted = TrainingInterrupted(
                "Training was interrupted by a KeyboardInterrupt raised during training."
            )
            interrupted.__cause__ = exc.__context__
            return interrupted
        if type(exc).__name__ == "ProcessRaisedException":
            found = _WORKER_INTERRUPTION.search(str(exc))
            if found:
                return TrainingInterrupted(found.group(1))
            return _worker_error(exc)
        return exc

    def _install(self) -> None:
        for s in _SIGNALS:
            signal.signal(s, self._handler)

    def __enter__(self) -> InterruptGuard:
        self.pending = None
        if threading.current_thread() is threading.main_thread():
            self._owner = os.getpid()
            self._previous = {s: signal.getsignal(s) for s in _SIGNALS}
            self._install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        if exc_type is None:  # the signal came after the last batch: still honour it
            self.check()

    def on_train_start(self, trainer, pl_module) -> None:
        # in every process that trains, after Lightning registered its handlers (its teardown
        # gives back the ones it found)
        if threading.current_thread() is threading.main_thread():
            self._install()

    # the step boundaries at which a recorded signal stops the run; with several ranks only
    # the step's end, where all ranks meet once per step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.world_size == 1:
            self.check(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.check(trainer)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.world_size == 1:
            self.check(trainer)


# a cellvi error raised in a spawned or forked worker, as torch passes it on (traceback text)
_WORKER_ERROR = re.compile(r"^cellvi\.errors\.(\w+): (.*)$", re.MULTILINE)


def _worker_error(exc: BaseException) -> BaseException:
    """A worker's cellvi error (e.g. the NaN guardrail's ``NonFiniteLossError``) raised again
    in the launching process as that class, so ``except NonFiniteLossError`` works the same
    with ``ddp_spawn``/``ddp_notebook`` as on one process; torch's exception is its cause."""
    if type(exc).__name__ != "ProcessRaisedException":
        return exc
    found = _WORKER_ERROR.findall(str(exc))
    if not found:
        return exc
    from .. import errors

    name, message = found[-1]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.CellviError)):
        return exc
    try:
        error = cls(message)
    except Exception:  # an error class with another signature: keep torch's exception
        return exc
    error.__cause__ = exc
    return error
