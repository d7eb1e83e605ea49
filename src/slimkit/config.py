"""Typed, versioned configs: unknown fields are refused, so a typo is an error."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimkit.errors import ConfigError


class SlimConfig(BaseModel):
    """Base of every technique's config.

    Subclasses set ``kind`` (the recipe stage they belong to, e.g. ``"quantize"``) and
    ``method`` (the name used in recipes). ``version`` lets saved configs be migrated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    kind: ClassVar[str] = ""
    method: ClassVar[str] = ""
    # False for transforms that are only recorded with a model (and replayed on loading),
    # never written as a recipe stage.
    recipe_stage: ClassVar[bool] = True
    version: int = 1

    def replay_on(self, layers: list[str]) -> SlimConfig:
        """This config applied to exactly ``layers``, as recorded when it first ran.

        Loading a saved model replays its transforms this way: choices the method made
        from data (such as layers kept in fp32 by sensitivity) are already in the list, so
        nothing is measured again.
        """
        update: dict[str, Any] = {}
        if "layers" in type(self).model_fields:
            update["layers"] = LayerSelector(targets=list(layers))
        if "fallback_layers" in type(self).model_fields:
            update["fallback_layers"] = 0
        return self.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict that :func:`config_from_dict` turns back into this config."""
        return {"kind": self.kind, "method": self.method, **self.model_dump(mode="json")}


class LayerSelector(BaseModel):
    """Chooses layers by qualified name.

    A pattern is an exact qualified name (``encoder.layer.0.output.dense``) or a regex
    prefixed with ``re:`` that must match the whole name (``re:.*attention.*``).
    ``ignore`` wins over ``targets``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(default_factory=lambda: ["re:.*"])
    ignore: list[str] = Field(default_factory=list)


def format_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """Turn a pydantic error into one line per problem, each with its key path and fix."""
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key; remove it or check its spelling")
        elif e["type"] == "missing":
            problems.append(f"{path}: required key is missing; add it")
        else:
            problems.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
    return problems


def validate_config(cls: type[SlimConfig], data: dict[str, Any], prefix: str = "") -> SlimConfig:
    """Build ``cls`` from ``data`` or raise :class:`ConfigError` listing every problem."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix)) from None
