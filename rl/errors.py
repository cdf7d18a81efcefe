"""User-facing errors.

Anything the user can fix (a bad job file, a missing data file, an unknown name) is raised as
`UserError`; the CLI prints its message as one paragraph and exits 2, never with a traceback.
"""

from __future__ import annotations

import errno

# errno values of a file system that has run out of room (space, or the user's quota)
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""

    exit_code = 2


class UnknownNameError(UserError, KeyError):
    """An unknown variant name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
