"""Stopping a run cleanly on SIGTERM (how preemptible TPU VMs and SLURM announce the end) or SIGINT (Ctrl-C).

`StopSignals` is used around the training loop and the final evaluation; the loop asks `stop_requested(step)` after every step and, when
it says yes, saves a checkpoint of that step and raises `Preempted`, which `main.py` reports in one line with
exit status 128 + the signal number. A second signal restores the default handling and so stops at once.

- One process: Python handlers set a flag; the loop stops after the step in progress.
- Several processes: every process must stop after the same step, or the checkpoint's collectives hang.
  JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM, tells every process, and
  agrees on a step (`multihost_utils.reached_preemption_sync_point`, called at every step; orbax's
  `CheckpointManager.reached_preemption` is the same call). SIGINT is turned into a SIGTERM of this process,
  so it goes through the same agreement; the SIGTERM handler is left to JAX.
"""
import signal

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; rerunning the same command resumes it."""

    def __init__(self, signum: int, checkpoint: str, during: str = ""):
        name = signal.Signals(signum).name
        if during:   # training is over and checkpointed: the rerun only evaluates
            message = (f"stopped by {name} during {during}; training is complete (last checkpoint {checkpoint}): "
                       f"rerun the same command to evaluate")
        else:
            message = f"stopped by {name}; saved checkpoint {checkpoint}: rerun the same command to resume"
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager: installs the handlers on entry (main thread only), restores the previous ones on exit."""

    def __init__(self, stopping: str = "after the current step and saving a checkpoint (send it again to stop at "
                                       "once, without saving)"):
        self.signum = None
        self._stopping = stopping
        self._previous = {}

    def _on_signal(self, signum, frame):
        if self.signum is not None:  # the second signal: stop now, as without this handler
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping {self._stopping}", flush=True)
        if self._multi:
            signal.raise_signal(signal.SIGTERM)  # JAX's handler: the processes agree on the step

    def __enter__(self):
        self._multi = jax.process_count() > 1  # only after jax.distributed.initialize
        handled = (signal.SIGINT,) if self._multi else SIGNALS
        try:
            for signum in handled:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: signals stay as they are
            self._restore()
        return self

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()

    def stop_requested(self, step: int) -> bool:
        """True after the step at which every process stops; call it after every step, on every process."""
        if self._multi:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None
