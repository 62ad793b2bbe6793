"""The one exception type fastcoop raises for bad input: the CLI prints it as one line and exits with code 2."""


class FastCoopError(Exception):
    """A problem with what the user asked for (bad path, mismatched cache, impossible option)."""


def changed(was: dict, now: dict, show=str) -> list[str]:
    """What differs between two sets of settings, as 'name: was → now' (each value written by `show`), for the
    errors that refuse to mix an existing output with a different request."""
    return [f"{key}: {show(was.get(key))} → {show(now.get(key))}" for key in sorted(was.keys() | now.keys())
            if was.get(key) != now.get(key)]


def first_few(names: list[str], most: int = 3) -> str:
    """The first `most` of `names`, comma-separated, with ', ...' where there are more (for messages)."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
