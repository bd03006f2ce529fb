"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or an unmet requirement; the message names what is wrong."""

    exit_code = 2


class ValidationFailed(UserError):
    """The exported model missed a threshold set in the pipeline (min_top1, max_abs_diff)."""

    exit_code = 3
