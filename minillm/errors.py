"""The base class of errors in what a user gave minillm: a config, data, a path, a model, a setting.

The command-line tools print these as one line, ``minillm-<cmd>: error: <message>``, and exit 2, without a
traceback (``MINILLM_DEBUG=1`` shows it); any other exception is a bug or an environment failure and keeps its
traceback. Each message names the file, key or field and what to do. Importing this module imports nothing else.
"""


class UserError(Exception):
    """An error in the user's input or setup, reported by the CLIs as one line (exit status 2)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be written (a full disk, permissions) or resumed (another world size, missing
    files); the message says which checkpoint is still good and how to continue."""
