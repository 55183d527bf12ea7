"""User-facing errors: one line, saying which input is wrong and what to do.

The CLI prints `nectar: <message>` for a `NectarError` and exits non-zero, never a traceback.
Library code raises it for bad input (files, names, lengths), never for programming errors.
"""


class NectarError(Exception):
    """A bad-input error whose message is a complete one-line explanation for the user."""

    exit_code = 2
