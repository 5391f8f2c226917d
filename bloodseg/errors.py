"""Errors that reach a user.

Every problem a user can cause (a bad file, a wrong option, a solver that cannot
finish) raises a subclass of :class:`BloodsegError` whose message says what was
wrong, where, and what to do. The CLI prints that message without a traceback.
"""


class BloodsegError(Exception):
    """Base class: the message is meant for a person, not a debugger."""


class DataError(BloodsegError, ValueError):
    """An input file or folder cannot be used (missing, unreadable, wrong shape or values)."""


class CheckpointError(BloodsegError, ValueError):
    """A checkpoint is missing, corrupt, unsafe, or belongs to another model."""


class SolverError(BloodsegError, RuntimeError):
    """An ODE solve could not finish (step cap reached, dt underflow, non-finite state)."""


class TrainingError(BloodsegError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""
