"""Choosing layers by name: exact names, ``re:`` regexes, ignore over targets."""

from __future__ import annotations

import pytest
from torch import nn

from slimkit.config import LayerSelector
from slimkit.errors import LayerSelectionError
from slimkit.layers import select_modules, select_names, set_module

NAMES = [
    "encoder.layer.0.attention.query",
    "encoder.layer.0.attention.key",
    "encoder.layer.0.output.dense",
    "encoder.layer.1.attention.query",
    "encoder.layer.1.attention.key",
    "encoder.layer.1.output.dense",
    "pooler.dense",
]


def sel(targets=None, ignore=None) -> LayerSelector:
    kw = {}
    if targets is not None:
        kw["targets"] = targets
    if ignore is not None:
        kw["ignore"] = ignore
    return LayerSelector(**kw)


def test_default_selects_everything_in_order():
    assert select_names(NAMES, sel()) == NAMES


def test_exact_names():
    chosen = select_names(NAMES, sel(["pooler.dense", "encoder.layer.0.output.dense"]))
    assert chosen == ["encoder.layer.0.output.dense", "pooler.dense"]


def test_exact_name_is_not_a_regex_or_prefix():
    with pytest.raises(LayerSelectionError):
        select_names(NAMES, sel(["encoder.layer.0"]))
    with pytest.raises(LayerSelectionError):
        select_names(["a.b"], sel(["a.*"]))


def test_regex_must_match_the_whole_name():
    assert select_names(NAMES, sel(["re:.*attention.*"])) == [n for n in NAMES if "attention" in n]
    assert select_names(NAMES, sel(["re:.*query"])) == [NAMES[0], NAMES[3]]
    # "dense" alone matches no whole name.
    with pytest.raises(LayerSelectionError, match="'re:dense'"):
        select_names(NAMES, sel(["re:dense"]))


def test_ignore_wins_over_targets():
    chosen = select_names(NAMES, sel(["re:encoder\\.layer\\.1\\..*", "pooler.dense"], ["re:.*\\.key", "pooler.dense"]))
    assert chosen == ["encoder.layer.1.attention.query", "encoder.layer.1.output.dense"]


def test_ignoring_everything_selects_nothing():
    assert select_names(NAMES, sel(ignore=["re:.*"])) == []


@pytest.mark.parametrize("field", ["targets", "ignore"])
def test_pattern_matching_nothing_names_the_pattern_and_candidates(field):
    with pytest.raises(LayerSelectionError) as info:
        select_names(NAMES, sel(**{field: ["encoder.layer.0.output.dnese"]}))
    msg = str(info.value)
    assert msg.startswith(f"{field}: 'encoder.layer.0.output.dnese' matches no layer")
    assert "encoder.layer.0.attention.query" in msg
    # Only six candidates are shown, then an ellipsis.
    assert "pooler.dense" not in msg and msg.endswith(", ...")


@pytest.mark.parametrize("field", ["targets", "ignore"])
def test_bad_regex_raises(field):
    with pytest.raises(LayerSelectionError) as info:
        select_names(NAMES, sel(**{field: ["re:encoder.(layer"]}))
    assert str(info.value).startswith(f"{field}: bad regex 're:encoder.(layer'")


def test_what_names_the_thing_chosen():
    with pytest.raises(LayerSelectionError, match="matches no node"):
        select_names(["a"], sel(["b"]), what="node")


def model() -> nn.Module:
    return nn.Sequential(
        nn.Embedding(10, 4),
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
    )


def test_select_modules_by_type():
    assert select_modules(model(), sel(), (nn.Linear,)) == ["1.0", "1.2"]
    assert select_modules(model(), sel(), (nn.Linear, nn.Embedding)) == ["0", "1.0", "1.2"]
    assert select_modules(model(), sel(ignore=["1.2"]), (nn.Linear,)) == ["1.0"]


def test_select_modules_only_considers_the_given_types():
    with pytest.raises(LayerSelectionError, match="'0' matches no layer"):
        select_modules(model(), sel(["0"]), (nn.Linear,))


def test_select_modules_without_any_layer_of_the_type():
    with pytest.raises(LayerSelectionError, match="no layers of type Conv1d, Conv2d"):
        select_modules(model(), sel(), (nn.Conv1d, nn.Conv2d))


def test_set_module_nested_and_top_level():
    m = model()
    new = nn.Identity()
    set_module(m, "1.2", new)
    assert m.get_submodule("1.2") is new
    top = nn.Identity()
    set_module(m, "0", top)
    assert m[0] is top
