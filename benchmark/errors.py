"""Exceptions the command line turns into one clear line and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix (a bad name, number or path); shown without a traceback."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the run ends FAILED with this message."""
