"""Exceptions the command line turns into one clear line and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix (a bad name, number or path); shown without a traceback."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the run ends FAILED with this message."""


class RunStopped(Exception):
    """A run stopped on purpose before its end (a pruned tuning trial); it ends KILLED."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, for a one-line ``UserError``."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
