"""The one error type media processing raises for bad input."""


class MediaError(ValueError):
    """A media input that cannot be used: missing, empty, corrupt, unsupported or out of limits.

    The message names the file (or says what kind of in-memory input it was).
    """
