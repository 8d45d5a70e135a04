"""The one exception type the CLI turns into a clean message (no traceback)."""


class EsparseError(Exception):
    """A user-facing error: the message names the problem and the fix."""
