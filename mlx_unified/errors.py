"""The base of every error a user can correct: a bad argument, file, checkpoint or request.

Front ends catch `InputError` and report its message as one line (the CLI exits with code 2), never as
a traceback. Each part of the package raises its own subclass (`ConfigError`, `MediaError`,
`ModelLoadError`, ...), whose message names the file or argument at fault. This module imports nothing,
so a front end can catch these errors before it has loaded MLX.
"""


class InputError(ValueError):
    """Input the user can correct; the message names the file or argument at fault."""
