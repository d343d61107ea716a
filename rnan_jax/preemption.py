"""Stopping a run cleanly: SIGTERM (a TPU/GPU preemption notice) or Ctrl-C becomes a flag the training loop
checks after each step and before each validation image, one decision for all processes (`agree`), and
`Preempted` once the step reached is saved.
Outside training (evaluate), `sigterm_raises` makes SIGTERM raise `Preempted` at once, as Ctrl-C raises
KeyboardInterrupt, so that what was done is kept.
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Iterator

import jax
import numpy as np


class Preempted(BaseException):
    """SIGTERM or Ctrl-C arrived; a checkpoint of the step reached was saved (the message says where), or, before
    the first step, there was nothing to save. `signum` is the signal (the CLI exits with 128 + signum, as if the
    signal had ended the process). A BaseException, as KeyboardInterrupt: raised in the middle of a restore, it
    must not be taken for a damaged checkpoint by an `except Exception`."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


class Preemption:
    """Turns SIGTERM (a TPU/GPU preemption notice) and a first Ctrl-C (SIGINT) into a flag the loop checks
    after each step and before each validation image, which then saves a checkpoint and stops; a second Ctrl-C
    interrupts at once, as usual.
    While `before_training` is set (the set-up: data, resume, validation images), nothing has been trained that
    a checkpoint could keep: SIGTERM raises Preempted at once, Ctrl-C KeyboardInterrupt, where SIGTERM used to
    kill the process with no line in train.log."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGTERM
        self._ctrl_c = False  # a Ctrl-C has come: the next one interrupts, whatever requested the stop
        self.before_training: str | None = None  # where the run resumes from, while the set-up runs
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                previous = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handler, as in a notebook's worker thread
                continue
            if signum == signal.SIGINT and previous is signal.SIG_IGN:  # started ignoring Ctrl-C: keep it so
                signal.signal(signum, previous)
                continue
            self._previous[signum] = previous
        return self

    def _handle(self, signum, frame):
        if self.before_training is not None:
            # also a flag: raised inside a callback (JAX's garbage-collection one), the exception is ignored
            # ("Exception ignored in: <function _xla_gc_callback>") and the run went on to train to the end
            self.requested, self.signum = True, signum
            raise self._setup_stop(signum, self.before_training)
        if signum == signal.SIGINT:
            if self._ctrl_c:  # also after a SIGTERM's request, which left every Ctrl-C a message (a hang at a
                raise KeyboardInterrupt  # data worker's death could then be stopped by kill -9 alone)
            self._ctrl_c = True
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop now, "
                        b"without one)\n")
        if not self.requested:
            self.signum = signum
        self.requested = True

    @staticmethod
    def _setup_stop(signum: int, where: str) -> BaseException:
        if signum == signal.SIGINT:
            return KeyboardInterrupt()
        return Preempted(f"{signal.Signals(signum).name} before the first step: nothing trained, nothing to save; "
                         f"rerun the same command to {where}", signum)

    def training_begins(self) -> None:
        """Ends the set-up: from here a signal is a flag and the step reached is saved. A signal of the set-up
        whose exception was lost (ignored where it was raised) stops the run here, as it would have there."""
        where, self.before_training = self.before_training, None
        if self.requested and where is not None:
            raise self._setup_stop(self.signum, where)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Preempted` wherever the program is, as Ctrl-C raises KeyboardInterrupt: for a long job
    that is not training (evaluate's hours of scoring), which SIGTERM ended with nothing said and nothing kept.
    The previous handler is back on leaving; off the main thread nothing changes."""

    def handle(signum, frame):
        raise Preempted(signal.Signals(signum).name, signum)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:  # None: a handler installed from C, which Python cannot put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def agree(flag: bool) -> bool:
    """True on every process if it is true on any (one decision for all hosts)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
