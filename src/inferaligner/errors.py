"""Exceptions raised for bad input. Each message says what went wrong and what to do."""


class InferAlignerError(Exception):
    """Base class: the CLI prints these as a one-line error instead of a traceback."""


class PromptError(InferAlignerError):
    """A prompt file or prompt set is empty, unreadable, or lacks the named column."""


class PromptTooLongError(InferAlignerError):
    """A prompt does not fit the model's context."""


class VectorFileError(InferAlignerError):
    """A file is not a valid InferAligner vector file."""


class VectorMismatchError(InferAlignerError):
    """Vectors do not fit the model they are applied to, or steering and gate vectors come from different shapes."""
