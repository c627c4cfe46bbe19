"""Errors that the CLI reports as one actionable line (tracebacks only with ``--debug``)."""


class PhatgooseError(Exception):
    """Base class: the message alone must tell the user what to do."""


class DataError(PhatgooseError):
    """A task file is missing, corrupt, or has no usable examples."""


class ModelError(PhatgooseError):
    """A base model cannot be loaded, or does not fit the experts."""


class LibraryError(PhatgooseError):
    """An expert library or adapter on disk is missing, corrupt or inconsistent."""


class TrainingDivergedError(PhatgooseError):
    """The training loss became NaN or infinite; the last good checkpoint was kept."""
