"""Ctrl-C and SIGTERM for the command line: the stop is raised in the main thread at once, and raised
again at the next progress checkpoint if Python swallowed the first one.

Python runs a signal's handler in the main thread between two bytecodes, wherever it is. When that is
inside a finalizer or a weakref callback (until 2026-12-07 NumPy work here created and dropped a
ThreadPoolExecutor per threaded call, whose weakref callbacks ran in the main thread; refsd.kernels now
keeps one pool, but any library's finalizer can be interrupted the same way), the exception cannot propagate: Python
reports it through ``sys.unraisablehook`` ("Exception ignored in ...") and carries on, and a Ctrl-C
once sampling has started was lost (seen once in CI: the run kept sampling). So the handlers also
record the stop, ``checkpoint()`` (called by the CLI's progress at every stage, step and loaded
tensor) raises it again, and a swallowed stop is kept out of the unraisable hook's traceback.
"""

from __future__ import annotations

import signal
import sys
import threading


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so every cleanup runs (atomic_write
    removes its temporary file) before ``refsd.cli.main`` reports it."""


_pending: type[BaseException] | None = None  # the stop a handler raised, until main reports it


def install():
    """Handlers for SIGINT (KeyboardInterrupt) and SIGTERM (Terminated) and the quiet unraisable hook;
    returns a function that restores what was there (a no-op off the main thread, where Python cannot
    install handlers)."""
    global _pending
    _pending = None
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(exc):
        def handler(signum, frame):
            global _pending
            _pending = exc
            raise exc

        return handler

    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if _pending is not None and isinstance(unraisable.exc_value, _pending):
            return  # a stop swallowed in a finalizer: checkpoint() raises it again, without a traceback
        previous_hook(unraisable)

    previous = {s: signal.signal(s, stop(e)) for s, e in ((signal.SIGINT, KeyboardInterrupt),
                                                           (signal.SIGTERM, Terminated))}
    sys.unraisablehook = hook

    def restore():
        global _pending
        _pending = None
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def checkpoint() -> None:
    """Raise the stop a signal asked for if it has not yet unwound the run (it was swallowed)."""
    if _pending is not None:
        raise _pending()
