"""The one user-facing error type, importable from every layer (data, models, cache, distill, engine).

A `UserError` is a mistake the user can fix: a bad path, option, config, dataset or cache. Its
message names the file or option and says what to do; the CLI prints it as one `Error:` line
and exits 1, never a traceback. Bugs stay ordinary exceptions.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the file/option and the fix."""


__all__ = ["UserError"]
