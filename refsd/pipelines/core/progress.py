"""Progress events from the pipeline core, for whoever shows them (the command line's bars).

The core announces its stages with ``stage(name, total)``: ``"encoding text"``, ``"encoding image"``
(img2img / inpainting), ``"sampling"`` (``total``: the steps of this sampler run; an SDXL base +
refiner run announces it once per stage) and ``"decoding"`` (``total``: the images). Per-step
progress is each pipeline's ``callback(i, total, latents)``. Nothing is shown unless a caller listens,
``with listen(fn): txt2img(...)``, ``fn(name, total)`` per event: a ContextVar, as refsd.trace.record
keeps its recordings, so listeners nest and threads stay apart; model code never prints (STYLE.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

STAGES = ("encoding text", "encoding image", "sampling", "decoding")

_listeners: contextvars.ContextVar[tuple[Callable, ...]] = contextvars.ContextVar("refsd_progress", default=())


@contextlib.contextmanager
def listen(fn: Callable[[str, int | None], None]) -> Iterator[None]:
    """Call ``fn(stage, total)`` for every ``stage`` event inside the block."""
    token = _listeners.set((*_listeners.get(), fn))
    try:
        yield
    finally:
        _listeners.reset(token)


def stage(name: str, total: int | None = None) -> None:
    """Announce that the core starts ``name`` (one of STAGES) to the listeners, if any."""
    for fn in _listeners.get():
        fn(name, total)
