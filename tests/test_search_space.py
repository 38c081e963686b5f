"""SearchSpace: rules, precedence, decisions and validation."""

import keras
import pytest

from fliqs_keras import formats
from fliqs_keras.search_space import DEFAULT_CHOICES, SearchSpace


def _names(fmts):
    return [f.name for f in fmts]


def test_default_space_searches_int4_and_int8():
    resolution = SearchSpace().resolve("conv1", "Conv2D")
    assert _names(resolution.choices.weights) == list(DEFAULT_CHOICES)
    assert resolution.choices.weights == resolution.choices.activations
    assert resolution.weight_decision == resolution.activation_decision == "conv1"
    assert resolution.rule == "*"


def test_layers_no_rule_names_stay_in_float_and_the_report_says_so():
    import fliqs_keras

    space = SearchSpace({"Dense": ["int4", "int8"]})
    resolution = space.resolve("conv1", "Conv2D")
    assert resolution.rule is None and resolution.choices.is_float
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(x))
    searchable = fliqs_keras.apply(keras.Model(inputs, outputs), {"Dense": ["int4", "int8"]})
    assert [w.name for w in fliqs_keras.searchable_layers(searchable)] == ["logits"]
    report = fliqs_keras.report(searchable)
    assert report["conv1"].status == "float" and "no rule of the search space names it" in report["conv1"].reason


def test_a_list_or_a_string_of_formats_given_to_the_constructor_means_every_supported_layer():
    for rules in (["int4", "int8"], "int4,int8"):
        space = SearchSpace(rules)
        assert [r.key for r in space.rules] == ["*"]
        assert _names(space.resolve("conv1", "Conv2D").choices.weights) == ["int4", "int8"]
    with pytest.raises(ValueError, match="An empty search space"):
        SearchSpace([])
    with pytest.raises(ValueError, match="rules must be a dict, a list of formats or a string"):
        SearchSpace(4)


def test_name_rules_beat_type_rules_beat_the_default():
    space = SearchSpace({"*": ["int4", "int8", "e4m3"], "Dense": "int8", "logits": None,
                         r"block\d+_conv": ["int2", "int4"], "block1_.*": "e5m2"})
    assert _names(space.resolve("stem", "Conv2D").choices.weights) == ["int4", "int8", "e4m3"]
    assert _names(space.resolve("fc1", "Dense").choices.weights) == ["int8"]
    assert space.resolve("fc1", "Dense").choices.fixed
    assert space.resolve("logits", "Dense").choices.is_float
    assert _names(space.resolve("block3_conv", "Conv2D").choices.weights) == ["int2", "int4"]
    # Among name rules the first that matches wins.
    assert _names(space.resolve("block1_conv", "Conv2D").choices.weights) == ["int2", "int4"]
    assert _names(space.resolve("block1_dw", "DepthwiseConv2D").choices.weights) == ["e5m2"]
    # Name rules match the whole name.
    assert space.resolve("xblock3_conv", "Conv2D").rule == "*"


def test_separate_activation_decisions():
    space = SearchSpace({"*": ["int4", "int8"], "conv1": {"weights": ["int4"], "activations": ["int8", "int16"]}},
                        separate_activations=True)
    resolution = space.resolve("conv1", "Conv2D")
    assert _names(resolution.choices.weights) == ["int4"]
    assert _names(resolution.choices.activations) == ["int8", "int16"]
    assert (resolution.weight_decision, resolution.activation_decision) == ("conv1/weights", "conv1/activations")
    weights_in_float = SearchSpace({"*": {"weights": None, "activations": "int8"}}, separate_activations=True)
    assert weights_in_float.resolve("c", "Conv2D").choices.weights == ()


def test_global_and_grouped_decisions():
    assert SearchSpace(decisions="global").resolve("conv7", "Conv2D").weight_decision == "global"
    grouped = SearchSpace(decisions={"stage1": r"s1_.*", "stage2": r"s2_.*"})
    assert grouped.resolve("s1_conv", "Conv2D").weight_decision == "stage1"
    assert grouped.resolve("s2_dw", "DepthwiseConv2D").weight_decision == "stage2"
    assert grouped.resolve("head", "Dense").weight_decision == "head"


@pytest.mark.parametrize(
    "identifier,names",
    [(["int2", "e4m3"], ["int2", "e4m3"]), ("int4, int8", ["int4", "int8"]),
     ({"*": "fp8_e4m3"}, ["e4m3"])],
)
def test_compact_forms(identifier, names):
    assert _names(SearchSpace.get(identifier).resolve("x", "Dense").choices.weights) == names


def test_config_round_trips_through_keras_serialisation():
    space = SearchSpace({"*": ["int4", "e4m3"], "Dense": "int8", "head": None},
                        decisions={"g": "b.*"})
    config = keras.saving.serialize_keras_object(space)
    again = keras.saving.deserialize_keras_object(config)
    assert again.get_config() == space.get_config()
    assert SearchSpace.get(space.get_config()).get_config() == space.get_config()
    separate = SearchSpace({"*": {"weights": ["int4"], "activations": ["int8"]}}, separate_activations=True)
    assert SearchSpace.from_config(separate.get_config()).get_config() == separate.get_config()


@pytest.mark.parametrize(
    "arguments,message",
    [
        (([],), "empty search space"),
        (("",), "empty search space"),
        (({"*": []},), r"'\*' has an empty list"),
        (({"*": ["int4", "in8"]},), r"entry '\*': Unknown number format 'in8'"),
        (({"conv1": "e4m3", "Dense": ["int4", "int4"]},), "lists int4 twice"),
        (({"conv[": "int8"},), "not a valid regex"),
        (({"*": {"weights": ["int4"]}},), "separate_activations=True"),
        (({"*": 7},), "expected a format name"),
        ((42,), "Cannot make a search space"),
    ],
)
def test_bad_search_spaces_name_the_entry(arguments, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.get(*arguments)


def test_bad_decisions_and_keys():
    with pytest.raises(ValueError, match="'block'"):
        SearchSpace(decisions="block")
    with pytest.raises(ValueError, match="bad regex"):
        SearchSpace(decisions={"g": "a["})
    with pytest.raises(ValueError, match="unknown keys"):
        SearchSpace({"*": {"weight": "int4"}}, separate_activations=True)


def test_choices_are_format_objects():
    choices = SearchSpace({"*": ["e4m3", "int8"]}).resolve("a", "Conv2D").choices.weights
    assert choices == (formats.get("e4m3"), formats.get("int8"))
