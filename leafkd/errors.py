"""The one exception type for user errors.

Anything the user can fix (a missing file, a malformed line, a model folder that is not a model) raises
`LeafkdError`; the CLI prints its message on one line and exits non-zero, without a traceback.
Programming errors stay ordinary exceptions so they keep their tracebacks.
"""


class LeafkdError(Exception):
    """A problem with the user's input, reported as one line."""
