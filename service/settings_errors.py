"""One short line per invalid setting, naming where it was set and the form it must take.

Pydantic's own report names the field (``port``), the error type and a documentation URL; an
operator set ``REID_PORT``, ``--port`` or ``port:`` in a settings file, and needs to know which one
and what to write instead. :func:`describe` turns a :class:`pydantic.ValidationError` of
:class:`~service.settings.Settings` into such lines.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

#: Command-line options whose name is not ``--FIELD`` (they are repeated once per value).
_OPTION_NAMES = {"models": "--model", "dataset_roots": "--dataset-root"}
#: Values never repeated in a message: a database or Milvus URL may carry a password.
_SECRET_FIELDS = frozenset({"database_url", "milvus_uri"})
_MAX_SHOWN = 60


def describe(
    exc: ValidationError,
    model: type[BaseModel],
    *,
    overrides: Mapping[str, Any],
    config_file: Path | None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The errors of ``exc``, one per line, e.g. ``REID_PORT='abc' is not valid: expected an integer ...``.

    Args:
        exc: the error raised while building ``model``.
        model: the settings class (its fields give the expected forms).
        overrides: the values given on the command line (they win, so they are named first).
        config_file: the settings file, if one was read.
        environ: the environment the settings were read from (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    env_names = {name.upper() for name in environ}
    prefix = str(model.model_config.get("env_prefix", ""))
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name, in_file = _where(field, prefix, overrides, config_file, env_names)
        if error["type"] == "extra_forbidden":
            lines.append(f"{name}{in_file} is not a setting: check its spelling against `reid serve --help`")
            continue
        shown = "" if field in _SECRET_FIELDS else _shown(error.get("input"))
        if error["type"] == "value_error":
            # Raised by one of the settings' own parsers, whose message already says what to write.
            reason = str(error["msg"]).removeprefix("Value error, ")
        else:
            info = model.model_fields.get(field)
            reason = f"expected {_expected(info.annotation, info.metadata)}" if info else str(error["msg"])
        lines.append(f"{name}{shown}{in_file} is not valid: {reason}")
    return "\n".join(lines)


def _where(
    field: str, prefix: str, overrides: Mapping[str, Any], config_file: Path | None, env_names: Iterable[str]
) -> tuple[str, str]:
    """(the name the operator used, " in the settings file NAME" or ""), in load_settings' precedence."""
    if field in overrides:
        return _OPTION_NAMES.get(field, "--" + field.replace("_", "-")), ""
    # An unknown key of a dotenv file is reported with its prefix already.
    env_name = (field if field.upper().startswith(prefix.upper()) else prefix + field).upper()
    if env_name in env_names or config_file is None:
        return env_name, ""
    file_key = env_name if config_file.name.endswith(".env") else field
    # The file's name only: the operator knows where it is, and a log need not show the layout.
    return file_key, f" in the settings file {config_file.name}"


def _shown(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    text = repr(value)
    return "=" + (text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 4] + "...'")


def _expected(annotation: Any, metadata: list[Any]) -> str:
    """The form a value of this field takes, in words."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _expected(args[0], [*args[1:], *metadata])
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _expected(kinds[0], metadata) if len(kinds) == 1 else "a valid value"
    if origin is list:
        return "a comma-separated list or a JSON list"
    if annotation is bool:
        return "true or false (or 1/0, yes/no, on/off)"
    if annotation is int:
        return "an integer" + _bounds(metadata)
    if annotation is float:
        return "a number" + _bounds(metadata)
    if annotation is Path:
        return "a path"
    return "text"


def _bounds(metadata: list[Any]) -> str:
    low = next((m for m in metadata if isinstance(m, Ge | Gt)), None)
    high = next((m for m in metadata if isinstance(m, Le | Lt)), None)
    if isinstance(low, Ge) and isinstance(high, Le):
        return f" between {low.ge} and {high.le}"
    parts = []
    if low is not None:
        parts.append(f"of at least {low.ge}" if isinstance(low, Ge) else f"greater than {low.gt}")
    if high is not None:
        parts.append(f"at most {high.le}" if isinstance(high, Le) else f"less than {high.lt}")
    return " " + " and ".join(parts) if parts else ""
