"""The exceptions refsd raises, and the integer and finite-number checks the public functions share. Every
message names the culprit (file, key, argument)."""

import math
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


def finite_number(value, what: str, *, error: type[RefsdError] = RefsdError) -> float:
    """``value`` as a finite float, else ``error`` naming ``what`` (one line: a CLI, PNG or API input)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise error(f"{what} {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(f):
        raise error(f"{what} must be a finite number, got {value!r}")
    return f
