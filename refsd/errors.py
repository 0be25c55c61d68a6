"""The exceptions refsd raises, and the integer-argument check the public functions share. Every
message names the culprit (file, key, argument)."""

import operator


class RefsdError(Exception):
    """Base class: catch this to handle any refsd failure."""


class BackendError(RefsdError):
    """An array library, device or dtype that refsd cannot use, or arrays that do not belong together."""


class WeightsError(RefsdError):
    """A weights file that is malformed, refused (pickle) or does not fit the model."""


class GoldenError(RefsdError):
    """A golden case that is missing, malformed, or does not match its manifest."""


def check_int(name: str, v, lo: int | None = None) -> int:
    """``v`` as a Python int (anything with ``__index__``; not bool, not float), >= ``lo`` if given;
    else a RefsdError naming ``name``."""
    if isinstance(v, bool):
        raise RefsdError(f"{name} must be an integer, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise RefsdError(f"{name} must be an integer, got {type(v).__name__} {v!r}") from None
    if lo is not None and v < lo:
        raise RefsdError(f"{name} must be >= {lo}, got {v}")
    return v
