"""Record intermediate tensors by diffusers module path, save them, load them back.

Model code marks a layer's output with ``emit``; nothing is kept unless the caller runs the model
under ``record()``::

    def resnet_block(p, x, temb, *, groups):
        ...
        return emit(p, x + h)                     # stored as "down_blocks.0.resnets.1"

    with record() as rec:
        unet(params, sample, t, context)
    rec.save("mine.safetensors")                  # keys trace/<name>, order in __metadata__

Naming rules (``golden/capture.py`` applies the same ones on the oracle side, so traces line up
by name):

- The name is the module path: ``where.prefix`` for a Params view, or ``where`` itself for a str.
- ``scope(name)`` prefixes ``name/`` to everything emitted inside it; scopes nest
  (``step.3/down_blocks.0``). Pipelines use it for per-step traces.
- A name emitted again in the same recording gets a repeat suffix: ``name``, ``name#1``,
  ``name#2``, ... (``#k`` is the (k+1)-th call). This is what a block reused across sampler steps
  without a scope produces.

Depth: every emit has a ``level`` -- 1 for the block outputs the goldens have always traced (resnets,
transformers and their attn1 / attn2 / ff, resamplers, mid blocks, VAE levels, CLIP layers), 2 for
the submodules a porter writes one by one (norms, proj_in / proj_out, to_q / to_k / to_v / to_out.0,
ff.net.0 / ff.net.2, resnet norm1 / conv1 / time_emb_proj / norm2 / conv2, VAE resnets, resamplers
and attention, CLIP self_attn / mlp / layer norms). ``record(depth=2)`` keeps both; the default
``depth=1`` records what it always did. ``tracing(level)`` tells model code whether a level is being
recorded, so a tensor that exists only for the trace (a layout view) is built only then.

File rule for ``load_trace``: with ``prefix=None``, tensors under ``trace/`` are the trace
(prefix stripped) if the file has any; otherwise every tensor is, under its own name. An explicit
``prefix`` (``"out/"``, ``"trace/"``, ``""`` for all) selects exactly the keys that start with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from refsd.errors import WeightsError
from refsd.xp import namespace as _namespace
from refsd.xp import to_numpy

TRACE_PREFIX = "trace/"
ORDER_KEY = "trace_order"  # __metadata__ key holding the JSON list of names in execution order

# The recordings active in this context (innermost last) and the scope path. ContextVars make
# record()/scope() nest and keep threads apart: a new thread starts with an empty context.
_recordings: contextvars.ContextVar[tuple[Recording, ...]] = contextvars.ContextVar("refsd_recordings", default=())
_scopes: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("refsd_scopes", default=())


class Recording(Mapping):
    """Tensors emitted under one ``record()``, in execution order: a Mapping name -> array.

    Values are NumPy arrays when recorded with ``to_host=True`` (the default), else the backend's
    arrays as emitted. ``order`` lists the names in the order they were emitted.
    """

    def __init__(self, *, to_host: bool = True, depth: int = 1):
        self.to_host = to_host
        self.depth = depth
        self._tensors: dict[str, Any] = {}
        self._calls: dict[str, int] = {}  # base name -> times emitted, for the #k repeat suffix
        self._lock = threading.Lock()  # emit may come from worker threads of one model call

    @property
    def order(self) -> list[str]:
        """Names in execution order."""
        return list(self._tensors)

    def __getitem__(self, name: str):
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tensors))

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Recording({len(self)} tensors, to_host={self.to_host})"

    def _add(self, name: str, x: Any) -> None:
        value = x
        if not self.to_host and self.depth > 1:  # level-2 tensors may be updated in place afterwards
            value = _namespace(x).asarray(x, copy=True)
        if self.to_host:
            value = to_numpy(x)
            if value is x or not value.flags.owndata:  # shares the model's buffer (NumPy, torch-CPU): copy
                value = value.copy()
        with self._lock:
            n = self._calls.get(name, 0)
            self._calls[name] = n + 1
            key = name if n == 0 else f"{name}#{n}"
            while key in self._tensors:  # an explicit "name#1" emitted earlier: keep counting
                n += 1
                self._calls[name] = n + 1
                key = f"{name}#{n}"
            self._tensors[key] = value

    def save(self, path, metadata: Mapping[str, str] | None = None) -> None:
        """Write a safetensors file: keys ``trace/<name>``, ``__metadata__["trace_order"]`` = JSON names.

        ``metadata`` (str -> str) is stored alongside; it may not use the reserved ``trace_order`` key.
        """
        from refsd.weights import save_safetensors

        metadata = dict(metadata or {})
        if ORDER_KEY in metadata:
            raise ValueError(f"metadata key {ORDER_KEY!r} is reserved for the recording's own order")
        order = self.order
        tensors = {TRACE_PREFIX + name: to_numpy(self._tensors[name]) for name in order}
        save_safetensors(path, tensors, {ORDER_KEY: json.dumps(order), **metadata})


@contextlib.contextmanager
def record(*, to_host: bool = True, depth: int = 1) -> Iterator[Recording]:
    """Collect every ``emit`` of level <= ``depth`` made in this context (and nested calls) into a new
    Recording.

    ``to_host=True`` copies each tensor to NumPy at emit time, so device memory is not held.
    ``depth``: 1 the block outputs (the default), 2 also their submodules (module docstring).
    Recordings nest: an emit is stored in every active recording deep enough for it.
    """
    if depth not in (1, 2):
        raise ValueError(f"trace depth must be 1 or 2, got {depth!r}")
    rec = Recording(to_host=to_host, depth=depth)
    token = _recordings.set(_recordings.get() + (rec,))
    try:
        yield rec
    finally:
        _recordings.reset(token)


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix ``name/`` to the names emitted inside (``step.3`` -> ``step.3/down_blocks.0``)."""
    if not name or "/" in name:
        raise ValueError(f"scope name must be non-empty and contain no '/': {name!r}")
    token = _scopes.set(_scopes.get() + (name,))
    try:
        yield
    finally:
        _scopes.reset(token)


def tracing(level: int = 1) -> bool:
    """Whether an active recording keeps emits of this ``level``."""
    return any(rec.depth >= level for rec in _recordings.get())


def emit(where: Any, x: Any, level: int = 1) -> Any:
    """Record ``x`` under ``where``'s module path if a recording at least ``level`` deep is active;
    return ``x`` unchanged.

    ``where``: a Params view (its ``.prefix``, e.g. ``down_blocks.0.resnets.1``) or a str name.
    Outside ``record()`` this is one ContextVar lookup.
    """
    recordings = _recordings.get()
    if not recordings:
        return x
    recordings = [rec for rec in recordings if rec.depth >= level]
    if not recordings:
        return x
    name = where if isinstance(where, str) else getattr(where, "prefix", None)
    if not isinstance(name, str):
        raise TypeError(f"emit needs a str or a Params view with a .prefix, got {type(where).__name__}")
    name = name.rstrip(".")
    if not name:
        raise ValueError("emit needs a non-empty name (the root Params view has none: pass a str)")
    scopes = _scopes.get()
    if scopes:
        name = "/".join(scopes) + "/" + name
    for rec in recordings:
        rec._add(name, x)
    return x


def detail(p: Any, name: str, x: Any) -> Any:
    """A level-2 emit of submodule ``name`` of the Params view ``p`` (``p.prefix + "." + name``);
    returns ``x``. The name is only built while a depth-2 recording is active."""
    if not tracing(2):
        return x
    prefix = p.prefix.rstrip(".")
    return emit(f"{prefix}.{name}" if prefix else name, x, level=2)


def load_trace(path, *, prefix: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read a trace from any safetensors file: ``({name: np.ndarray}, names in execution order)``.

    ``prefix=None``: the ``trace/`` tensors if there are any, else all tensors. A given ``prefix``
    selects the keys starting with it (``""`` = all). Names have the prefix stripped; the order is
    ``trace_order``'s. Raises WeightsError on a malformed file.
    """
    from refsd.weights import load_numpy, read_header

    prefix, names, _ = _select(path, read_header(path), prefix)
    arrays, _ = load_numpy(path)
    return {n: arrays[prefix + n] for n in names}, names


def trace_order(path, *, prefix: str | None = None) -> tuple[list[str], bool]:
    """The names ``load_trace`` selects, in execution order, and whether that order was recorded.

    The order is ``__metadata__["trace_order"]`` when the selection is ``trace/`` and the file has
    that key (selected names it does not list follow in file order): then the flag is True.
    Otherwise it is file (header) order and the flag is False. Reads the header only.
    """
    from refsd.weights import read_header

    _, names, recorded = _select(path, read_header(path), prefix)
    return names, recorded


def _select(path, header, prefix: str | None) -> tuple[str, list[str], bool]:
    """(key prefix, names in order, order recorded?) for ``load_trace``'s selection rule."""
    if prefix is None:
        prefix = TRACE_PREFIX if any(k.startswith(TRACE_PREFIX) for k in header.tensors) else ""
    names = [k[len(prefix) :] for k in header.tensors if k.startswith(prefix)]
    if prefix != TRACE_PREFIX or ORDER_KEY not in header.metadata:
        return prefix, names, False
    recorded = _parse_order(path, header.metadata[ORDER_KEY])
    present, listed = set(names), set(recorded)
    missing = [n for n in recorded if n not in present]
    if missing:
        raise WeightsError(f"{path}: {ORDER_KEY} names tensors the file lacks: {', '.join(missing[:5])}")
    return prefix, recorded + [n for n in names if n not in listed], True


def _parse_order(path, text: str) -> list[str]:
    """The ``trace_order`` metadata value as a list of names; WeightsError when it is not one."""
    try:
        order = json.loads(text)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: __metadata__[{ORDER_KEY!r}] is not JSON: {e}") from None
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or len(set(order)) != len(order):
        raise WeightsError(f"{path}: __metadata__[{ORDER_KEY!r}] must be a JSON list of distinct names")
    return order
