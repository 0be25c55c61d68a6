"""refsd.cli_signals: a Ctrl-C / SIGTERM that Python swallows (raised inside a finalizer) is raised again at
the next progress checkpoint, without the unraisable hook's traceback; handlers are restored after."""

import gc
import os
import signal

import pytest

from refsd import cli_signals


class _SignalsInFinalizer:
    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)  # the handler runs here, where its exception cannot propagate


@pytest.mark.parametrize("sig, exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, cli_signals.Terminated)])
def test_swallowed_stop_is_raised_at_the_next_checkpoint(capfd, sig, exc):
    before = signal.getsignal(sig)
    restore = cli_signals.install()
    try:
        cli_signals.checkpoint()  # nothing pending: no-op
        obj = _SignalsInFinalizer(sig)
        del obj
        gc.collect()
        assert "Exception ignored" not in capfd.readouterr().err
        with pytest.raises(exc):
            cli_signals.checkpoint()
    finally:
        restore()
    assert signal.getsignal(sig) is before
    cli_signals.checkpoint()  # restored: nothing pending


def test_stop_raised_directly_in_the_main_thread():
    restore = cli_signals.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the handler runs between bytecodes
                pass
    finally:
        restore()
