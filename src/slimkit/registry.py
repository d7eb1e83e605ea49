"""Methods registered against their config type: adding a method is adding one file."""

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
    _load_builtin_methods()
    return _CONFIGS.get((kind, method))


def methods(kind: str) -> list[str]:
    """Names of every method registered for stage ``kind``."""
    _load_builtin_methods()
    return sorted(m for k, m in _CONFIGS if k == kind)


def kinds() -> list[str]:
    """The stage kinds a recipe may name."""
    _load_builtin_methods()
    return sorted({k for (k, _), cls in _CONFIGS.items() if cls.recipe_stage})


def config_from_dict(data: dict[str, Any]) -> SlimConfig:
    """Inverse of :meth:`SlimConfig.to_dict`."""
    data = dict(data)
    kind, method = data.pop("kind"), data.pop("method")
    cls = config_class(kind, method)
    if cls is None:
        raise ConfigError(f"unknown {kind} method {method!r}; known: {methods(kind)}")
    return cls.model_validate(data)


def _load_builtin_methods() -> None:
    # Importing the method modules runs their @register decorators. They are listed
    # explicitly (not discovered by scanning) so what is registered is plain to see.
    import slimkit.compress.cluster  # noqa: F401
    import slimkit.deploy.export  # noqa: F401
    import slimkit.distill.stage  # noqa: F401
    import slimkit.memory.stages  # noqa: F401
    import slimkit.prune.cnn  # noqa: F401
    import slimkit.prune.heads  # noqa: F401
    import slimkit.prune.magnitude  # noqa: F401
    import slimkit.quantize.convert  # noqa: F401
    import slimkit.quantize.dynamic  # noqa: F401
    import slimkit.quantize.lowp  # noqa: F401
    import slimkit.quantize.ort  # noqa: F401
    import slimkit.quantize.qat  # noqa: F401
    import slimkit.quantize.static_int8  # noqa: F401
    import slimkit.quantize.weight_only  # noqa: F401
    import slimkit.train.head  # noqa: F401
    import slimkit.train.stage  # noqa: F401
