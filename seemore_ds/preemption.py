"""Stop signals: SIGTERM, SIGINT and SIGUSR1 ask a run to finish its step, save and exit.

Clusters end jobs with a signal (SLURM sends SIGTERM at the time limit, and SIGUSR1 ahead of it
when asked with ``--signal``; Ctrl-C sends SIGINT). The first one only sets a flag, which the
trainer checks after each step; a second one ends the process at once.

One request can reach a rank by two routes: the terminal or SLURM signals every process, and the
``deepspeed`` launcher, signalled too, forwards SIGTERM to its ranks a moment later. A repeat within
``REPEAT_WINDOW_S`` of the first is therefore taken as the same request, not as a second one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_WINDOW_S = 1.0


class StopSignals:
    """Installs the handlers for the life of a ``with`` block and remembers the first signal."""

    def __init__(self):
        self.received: int | None = None  # the first stop signal's number
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python lets only the main thread handle signals; they keep their usual effect
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return
        # A second request: die by this signal now, as if no handler had been installed.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        return self.received is not None


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by ``signum`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1)."""
    return 128 + signum


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; the CLI prints the message and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
