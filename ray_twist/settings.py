"""The shared base of every YAML config: strict pydantic models and readable errors.

Each package owns its own settings models (`ray_twist.train.config`, `ray_twist.build.config`,
`ray_twist.serve.config`, ...), all built on `Settings`: unknown keys are errors, so a typo in
a YAML file fails loudly instead of being silently ignored. `load_yaml` turns validation
errors into one message per problem that names the file and the dotted key path
(``build.yaml: training.lr: ...``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Settings", "format_validation_error", "json_digest", "load_yaml"]


class Settings(BaseModel):
    """Base of all config models: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ConfigError(ValueError):
    """A config file does not validate; the message names the file and each bad key."""


M = TypeVar("M", bound=BaseModel)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: dotted.key.path: message``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"{source}: {key}: {err['msg']}")
    return "\n".join(lines)


def load_yaml(path: str | Path, model_cls: type[M]) -> M:
    """Parse and validate a YAML file; errors name the file and the key, not a traceback."""
    path = Path(path)
    try:
        data: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc


def json_digest(value: Any) -> str:
    """sha256 (hex) of `value` as sorted-key JSON: the content key of settings, runs and
    builds, stable across dict order and process restarts."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
