"""Methods registered against their config type: adding a method is adding one file.

The lookups by name see the methods registered so far. :mod:`slimkit.stages` imports
every built-in method, so code that turns names into configs looks them up there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError

_HANDLERS: dict[type[SlimConfig], Callable[..., Any]] = {}
_CONFIGS: dict[tuple[str, str], type[SlimConfig]] = {}


def register(config_cls: type[SlimConfig]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register(DynamicInt8Config)`` makes the function its handler."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = (config_cls.kind, config_cls.method)
        if key in _CONFIGS and _CONFIGS[key] is not config_cls:
            raise RuntimeError(f"two configs registered as {key}")
        _HANDLERS[config_cls] = fn
        _CONFIGS[key] = config_cls
        return fn

    return wrap


def handler_for(config: SlimConfig) -> Callable[..., Any]:
    """The function registered for ``type(config)``."""
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(f"no method is registered for {type(config).__name__}") from None


def config_class(kind: str, method: str) -> type[SlimConfig] | None:
    """The config class registered as ``method`` of stage ``kind``, or None."""
    return _CONFIGS.get((kind, method))


def methods(kind: str) -> list[str]:
    """Names of every method registered for stage ``kind``."""
    return sorted(m for k, m in _CONFIGS if k == kind)


def kinds() -> list[str]:
    """The stage kinds a recipe may name."""
    return sorted({k for (k, _), cls in _CONFIGS.items() if cls.recipe_stage})


def config_from_dict(data: dict[str, Any]) -> SlimConfig:
    """Inverse of :meth:`SlimConfig.to_dict`."""
    data = dict(data)
    kind, method = data.pop("kind"), data.pop("method")
    cls = config_class(kind, method)
    if cls is None:
        raise ConfigError(f"unknown {kind} method {method!r}; known: {methods(kind)}")
    return cls.model_validate(data)
