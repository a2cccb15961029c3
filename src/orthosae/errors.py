"""The one exception type that reaches users as a one-line message (exit code 2, no traceback)."""


class UserError(Exception):
    """Bad input from the user: a malformed config, a wrong shape, a missing or corrupt file.

    The message must fit on one line and say what is wrong and what to do about it.
    """
