"""The one exception type fastcoop raises for bad input: the CLI prints it as one line and exits with code 2."""


class FastCoopError(Exception):
    """A problem with what the user asked for (bad path, mismatched cache, impossible option)."""
