"""The exceptions refsd raises. Every message names the culprit (file, key, argument)."""


class RefsdError(Exception):
    """Base class: catch this to handle any refsd failure."""


class BackendError(RefsdError):
    """An array library, device or dtype that refsd cannot use, or arrays that do not belong together."""


class WeightsError(RefsdError):
    """A weights file that is malformed, refused (pickle) or does not fit the model."""


class GoldenError(RefsdError):
    """A golden case that is missing, malformed, or does not match its manifest."""
