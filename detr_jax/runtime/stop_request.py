"""A graceful stop on SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler sends before it
preempts a job): the first signal asks the training loop to finish its step, write a
checkpoint and exit; a second one exits at once.

A checkpoint being written when the second signal comes is left unfinished in orbax's
temporary folder and never taken for a finished one, so the previous checkpoints stay the
ones a resumed run reads.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM into a request (`requested`:
    the signal's name, None until one comes) and exits the process on the second one.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker
    thread) the signals keep their usual effect and `requested` stays None.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):  # noqa: ARG002 -- the signal module's signature
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"\n{name}: finishing this step and writing a checkpoint; send it again to exit at once",
                  file=sys.stderr, flush=True)
            return
        print(f"{name} again: exiting now, without a checkpoint of the steps since the last one",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)  # noqa: SLF001 -- no cleanup: the user asked to stop now

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
