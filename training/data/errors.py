"""Exceptions raised by the dataset parsers, the registry and the synthetic-data writer.

All derive from ``ValueError`` (through :class:`DatasetError`) so that callers who only care about
"the user gave us something unusable" can catch one type; the service maps them to problem+json.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """Base class: a dataset could not be built from what the user gave."""


class DatasetLayoutError(DatasetError):
    """The root folder does not have the on-disk layout of the requested dataset.

    The message names what is missing and what was expected instead.
    """


class UnknownDatasetError(DatasetError):
    """No dataset is registered under the requested name; the message lists the available names."""


class SynthOutputError(DatasetError):
    """``write_synthetic`` refused an output folder (not empty and not a previous synthetic output)."""
