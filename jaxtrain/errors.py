"""The one error type users see: a message for people, printed by the CLI without a traceback."""


class JaxtrainError(ValueError):
    """Bad input or state, described in one line that names the key, path or value at fault."""
