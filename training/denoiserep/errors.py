"""The one exception type of the DenoiseRep library.

It derives from ``ValueError`` because every case is "the caller asked for something this model or
these settings cannot give": an unknown layer spec, a model with nothing to convert, fusing a model
that was never converted. Messages say what to do instead.
"""

from __future__ import annotations


class DenoiseRepError(ValueError):
    """A DenoiseRep operation was asked for something the model or its settings cannot give."""
