"""The config file: found (``--config FILE``, else ``$NANOBATCH_CONFIG``, else ``./nanobatch.yaml`` if present)
and read as a mapping of sections; :mod:`nanobatch.config` makes the settings of it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, not_utf8
from .safe_yaml import load_yaml

__all__ = ["find_config_file", "read_config_file"]


def find_config_file(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    """``--config`` if given, else ``$NANOBATCH_CONFIG``, else ``./nanobatch.yaml`` if it exists."""
    if explicit is not None:
        return Path(explicit)
    if env.get("NANOBATCH_CONFIG"):
        return Path(env["NANOBATCH_CONFIG"])
    local = Path("nanobatch.yaml")
    return local if local.is_file() else None


_MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: Path) -> dict[str, Any]:
    """The sections of the config file at *path*; ConfigError if it cannot be read or is not a mapping of them."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)  # not a file without end (/dev/zero), read until memory runs out
        if len(raw) > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: over {_MAX_CONFIG_BYTES:,} bytes: not a config file")
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {not_utf8(exc)}") from None
    try:
        data = load_yaml(text, as_written=False)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of sections (api, limits, ...)")
    return {section: value for section, value in data.items() if value is not None}  # "pricing:" alone = empty
