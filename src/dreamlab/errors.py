"""Errors a user can act on. The CLI and server print their message as one line; no traceback."""


class DreamlabError(Exception):
    """Base class: a problem with the user's input, files or environment, stated in one line."""


class UnknownNameError(DreamlabError, KeyError):
    """A name (sampler, schedule, model...) that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidRequestError(DreamlabError, ValueError):
    """A request parameter is out of range or inconsistent with the model."""


class NonFiniteError(DreamlabError, FloatingPointError):
    """The model produced NaN or Inf."""


class ModelNotFoundError(DreamlabError, FileNotFoundError):
    """No model at the given path, or no trained default model installed."""


class IntegrityError(DreamlabError):
    """A file's hash does not match the one recorded for it."""


class UnsafeCheckpointError(DreamlabError):
    """A pickled checkpoint was refused because pickle loading was not allowed explicitly."""


class Cancelled(DreamlabError):
    """Raised from an ``on_step`` callback to stop sampling early."""


class CheckpointError(DreamlabError):
    """A file that is not a checkpoint dreamlab can load: not a checkpoint at all, truncated, or of an
    architecture it does not know or support."""
