"""Datasets by name: ``build_dataset("market1501", root)`` is how the CLI and the service ask for data.

Parsers register with the :func:`register_dataset` class decorator. The built-in ones live in their
own modules and are imported on first use, so importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.data.dataset import DatasetParser, ReIDDataset
from training.data.errors import DatasetError, UnknownDatasetError

logger = logging.getLogger(__name__)

KINDS = ("person", "vehicle")

_BUILTIN_MODULES = (
    "training.data.market1501",
    "training.data.dukemtmc",
    "training.data.cuhk03",
    "training.data.msmt17",
    "training.data.veri776",
    "training.data.vehicleid",
    "training.data.folder",
)

_REGISTRY: dict[str, type[DatasetParser]] = {}
_ALIASES: dict[str, str] = {}


def _normalise(name: str) -> str:
    # "Market-1501", "market_1501" and "market1501" all name the same dataset.
    return name.lower().replace("-", "").replace("_", "")


def register_dataset(
    name: str, *, kind: str, aliases: tuple[str, ...] = ()
) -> Callable[[type[DatasetParser]], type[DatasetParser]]:
    """Class decorator registering a :class:`DatasetParser` subclass under ``name``.

    Args:
        name: the registry name (lower case, e.g. ``market1501``).
        kind: ``person`` or ``vehicle``.
        aliases: other spellings accepted by :func:`build_dataset` (``duke`` for ``dukemtmc``).
    """
    if kind not in KINDS:
        raise DatasetError(f"dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def decorator(cls: type[DatasetParser]) -> type[DatasetParser]:
        if not (isinstance(cls, type) and issubclass(cls, DatasetParser)):
            raise TypeError(f"register_dataset expects a DatasetParser subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise DatasetError(f"dataset name {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        cls.kind = kind
        _REGISTRY[name] = cls
        for alias in (name, *aliases):
            _ALIASES[_normalise(alias)] = name
        return cls

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _parser_class(name: str) -> type[DatasetParser]:
    _load_builtins()
    canonical = _ALIASES.get(_normalise(name))
    if canonical is None:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}: available datasets are {', '.join(available_datasets())}"
        )
    return _REGISTRY[canonical]


def available_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def dataset_kind(name: str) -> str:
    """``person`` or ``vehicle`` (for ``folder``, the default kind; the ``kind`` option overrides it)."""
    return _parser_class(name).kind


def dataset_options(name: str) -> dict[str, Any]:
    """The options ``build_dataset(name, root, **options)`` accepts, with their defaults."""
    parameters = inspect.signature(_parser_class(name).__init__).parameters
    return {p.name: p.default for p in parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_dataset(name: str, root: str | Path, **options: Any) -> ReIDDataset:
    """Parse the dataset ``name`` found under ``root``.

    Args:
        name: a registered name (see :func:`available_datasets`); case, '-' and '_' are ignored.
        root: the dataset folder in its published layout.
        **options: parser options, e.g. ``test_size=1600`` for VehicleID, ``variant="labeled"``
            for CUHK03, ``manifest="file.csv"`` for ``folder``; ``strict=True`` for all.

    Raises:
        UnknownDatasetError: unknown name (the message lists the available ones).
        DatasetLayoutError: ``root`` does not have the dataset's layout.
        DatasetError: an unknown or invalid option.
    """
    cls = _parser_class(name)
    accepted = dataset_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(
            f"dataset {cls.name} does not take option(s) {', '.join(unknown)}: "
            f"it accepts {', '.join(sorted(accepted))}"
        )
    dataset = cls(root, **options).load()
    logger.info(
        "%s: %d train / %d query / %d gallery images from %s",
        cls.name,
        len(dataset.train),
        len(dataset.query),
        len(dataset.gallery),
        dataset.root,
    )
    return dataset
