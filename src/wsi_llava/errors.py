"""The base class of user-facing errors.

An error a user can fix (a bad config key, a missing file they named, a broken manifest row) derives
from :class:`WsiLlavaError`; its message alone must say what is wrong and what to do: the file, the
row and the field where they apply. The ``wsi-llava`` dispatcher prints such an error as one
``error: …`` message on stderr and exits with code 2 (``wsi-llava --debug …`` shows the traceback);
any other exception is a bug and keeps its traceback. This module imports nothing of the package so
every layer can use it.
"""

from __future__ import annotations


class WsiLlavaError(Exception):
    """An error caused by the user's input; the message names file, row and field and what to do."""


class MissingFileError(WsiLlavaError, FileNotFoundError):
    """A file or folder the user named (a config key, a command-line path) does not exist.

    Also a :class:`FileNotFoundError`, so code that catches that keeps working.
    """
