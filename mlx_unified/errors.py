"""The base of every error a user can correct: a bad argument, file, checkpoint or request.

Front ends catch `InputError` and report its message as one line (the CLI exits with code 2), never as
a traceback. Each part of the package raises its own subclass (`ConfigError`, `MediaError`,
`ModelLoadError`, ...), whose message names the file or argument at fault. This module imports nothing,
so a front end can catch these errors before it has loaded MLX.
"""

from __future__ import annotations

from collections.abc import Mapping


class InputError(ValueError):
    """Input the user can correct; the message names the file or argument at fault."""


class MediaError(InputError):
    """A media input that cannot be used: missing, empty, corrupt, unsupported or out of limits.

    The message names the file (or says what kind of in-memory input it was).
    """


class ParameterError(InputError):
    """A generation parameter out of range or of the wrong type; `param` names it."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason

    def renamed(self, names: Mapping[str, str]) -> ParameterError:
        """The same refusal naming the parameter as `names` spells it (a front end's flag)."""
        return type(self)(names.get(self.param, self.param), self.reason)
