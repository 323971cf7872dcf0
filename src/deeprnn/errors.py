"""Typed errors. ``str(error)`` is one line: what is wrong and how to fix it.

The command line catches :class:`DeepRNNError` and prints ``deeprnn: error: <message>``
with exit status 2; library callers catch the specific subclass.
"""


class DeepRNNError(Exception):
    """Base class of every error deeprnn raises on purpose."""


class ConfigError(DeepRNNError, ValueError):
    """A configuration value is out of range or of the wrong type (message names the field)."""


class CorpusError(DeepRNNError):
    """Text could not be read, decoded, found or is too small."""


class VocabError(DeepRNNError):
    """Tokens outside the vocabulary, or a vocabulary that does not match a checkpoint."""


class CheckpointError(DeepRNNError):
    """A checkpoint or run directory is missing, corrupt, unsafe or incompatible."""
