"""The one exception type for mistakes a user can fix (bad option, missing data, ...).

The entry point prints its message as a single line and exits non-zero; anything else that
escapes is a bug in the framework and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix."""
