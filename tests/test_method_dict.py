"""jpeft.method_to_dict / jpeft.method_from_dict: every method round-trips through JSON; bad dicts fail clearly."""

import json

import pytest

import jpeft

QV = ("query", "value")

#: One instance per method class that jpeft exports, with non-default fields where it helps.
EXAMPLES = {
    "LoRA": jpeft.LoRA(targets=QV, rank=4, alpha=16.0, use_rslora=True, extra_trainable=r"classifier/.*"),
    "DoRA": jpeft.DoRA(targets="query", rank=2),
    "LoRAFA": jpeft.LoRAFA(targets=QV, rank=4),
    "LoRAPlus": jpeft.LoRAPlus(targets=QV, rank=4, lr_ratio=8.0),
    "LoRADrop": jpeft.LoRADrop(targets=QV, rank=4, keep=("encoder/layer/0/attention/self/query",)),
    "AdaLoRA": jpeft.AdaLoRA(targets=QV, total_step=100, init_r=6, target_r=2),
    "QLoRA": jpeft.QLoRA(targets=QV, rank=4, quant=jpeft.NF4(block_size=32)),
    "IA3": jpeft.IA3(targets=("key", "value"), feedforward="intermediate"),
    "BitFit": jpeft.BitFit(variant="all"),
    "DiffPruning": jpeft.DiffPruning(targets=QV, log_alpha_init=3.0),
    "Freeze": jpeft.Freeze(trainable_layers=2),
    "Full": jpeft.Full(),
    "HoulsbyAdapter": jpeft.HoulsbyAdapter(reduction_factor=8),
    "PfeifferAdapter": jpeft.PfeifferAdapter(reduction_factor=32),
    "ParallelAdapter": jpeft.ParallelAdapter(bottleneck=16),
    "ScaledParallelAdapter": jpeft.ScaledParallelAdapter(bottleneck=16, scaling=2.0),
    "MultiHeadParallelAdapter": jpeft.MultiHeadParallelAdapter(bottleneck=16, num_heads=4),
    "AdapterFusion": jpeft.AdapterFusion(adapters=("sst", "mnli"), adapter=jpeft.PfeifferAdapter()),
    "PrefixTuning": jpeft.PrefixTuning(num_virtual_tokens=8, projection_hidden_size=64),
    "PTuningV2": jpeft.PTuningV2(num_virtual_tokens=8),
    "PromptTuning": jpeft.PromptTuning(num_virtual_tokens=5, init="vocab"),
    "PromptEnsemble": jpeft.PromptEnsemble(num_virtual_tokens=4, k=3),
    "PTuning": jpeft.PTuning(num_virtual_tokens=6, encoder_hidden_size=32),
    "LadderSideTuning": jpeft.LadderSideTuning(num_heads=12, reduction=4),
    "MAM": jpeft.MAM(prefix_tokens=12, adapter_bottleneck=48),
    "UniPELT": jpeft.UniPELT(rank=4, prefix_tokens=5),
    "Compose": jpeft.compose(jpeft.LoRA(targets=["query"], rank=2), jpeft.IA3()),
    "OnQuantized": jpeft.on_quantized(jpeft.LoRA(targets=QV, rank=4)),
}
if hasattr(jpeft, "IntrinsicPromptTuning"):  # (issue 13, landing alongside)
    EXAMPLES["IntrinsicPromptTuning"] = jpeft.IntrinsicPromptTuning(dim=5, num_virtual_tokens=4)


def _method_classes():
    return sorted(
        n
        for n in jpeft.__all__
        if isinstance(getattr(jpeft, n), type) and issubclass(getattr(jpeft, n), jpeft.Method) and n != "Method"
    )


def test_every_exported_method_has_an_example():
    assert set(_method_classes()) <= set(EXAMPLES), f"add an example for {set(_method_classes()) - set(EXAMPLES)}"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip_through_json(name):
    method = EXAMPLES[name]
    assert type(method).__name__ == name
    d = jpeft.method_to_dict(method)
    text = json.dumps(d)  # plain JSON: no objects left
    back = jpeft.method_from_dict(json.loads(text))
    assert back == method and type(back) is type(method)
    assert jpeft.method_to_dict(back) == d


def test_composition_is_nested_dicts():
    d = jpeft.method_to_dict(EXAMPLES["Compose"])
    inner = [m["__dataclass__"].rpartition(":")[2] for m in d["fields"]["methods"]]
    assert inner == ["LoRA", "IA3"]


def test_hand_written_dict_with_bare_class_names():
    d = {
        "__dataclass__": "Compose",
        "fields": {
            "methods": [
                {"__dataclass__": "LoRA", "fields": {"targets": ["query"], "rank": 2}},
                {"__dataclass__": "HoulsbyAdapter", "fields": {"reduction_factor": 8}},
            ]
        },
    }
    assert jpeft.method_from_dict(d) == jpeft.compose(
        jpeft.LoRA(targets=("query",), rank=2), jpeft.HoulsbyAdapter(reduction_factor=8)
    )


def test_int_for_a_float_field_is_accepted():
    d = {"__dataclass__": "jpeft:LoRA", "fields": {"targets": "query", "alpha": 16}}
    assert jpeft.method_from_dict(d) == jpeft.LoRA(targets="query", alpha=16.0)


@pytest.mark.parametrize(
    "d, match",
    [
        ({"__dataclass__": "jpeft:SuperLoRA", "fields": {}}, r"unknown method or class 'SuperLoRA' at SuperLoRA;.*LoRA"),
        (
            {"__dataclass__": "Compose", "fields": {"methods": [{"__dataclass__": "Nope", "fields": {}}]}},
            r"unknown method or class 'Nope' at Compose\.methods\[0\]",
        ),
        ({"__dataclass__": "LoRA", "fields": {"targets": "q", "rnak": 4}}, r"LoRA has no field 'rnak' \(at LoRA\.rnak\)"),
        ({"__dataclass__": "LoRA", "fields": {"rank": 4}}, r"LoRA \(LoRA\) needs the field\(s\) targets"),
        ({"__dataclass__": "LoRA", "fields": {"targets": "q", "rank": "8"}}, r"LoRA\.rank = '8' \(str\) has the wrong type; expected int"),
        ({"__dataclass__": "LoRA", "fields": {"targets": "q", "rank": True}}, r"LoRA\.rank = True \(bool\) has the wrong type"),
        ({"__dataclass__": "BitFit", "fields": {"variant": 3}}, r"BitFit\.variant = 3 \(int\) has the wrong type; expected str"),
        ({"__dataclass__": "LoRA", "fields": {"targets": [1, 2]}}, r"LoRA\.targets = \[1, 2\] \(list\) has the wrong type"),
        ({"__dataclass__": "QLoRA", "fields": {"targets": "q", "quant": 4}}, r"QLoRA\.quant = 4 \(int\) has the wrong type; expected NF4"),
        ({"__dataclass__": "NF4", "fields": {}}, r"NF4 is a jpeft class but not a method"),
        ({"__dataclass__": "LoRA", "fields": {"targets": "q", "rank": -1}}, r"method_from_dict: .*rank must be a positive int"),
        ({"method": "LoRA", "rank": 4}, r"expected a dict like \{'__dataclass__': 'jpeft:LoRA'"),
        ({"__dataclass__": "LoRA", "fields": {"targets": "q"}, "rank": 4}, r"LoRA must be \{'__dataclass__': \.\.\., 'fields'"),
    ],
)  # fmt: skip
def test_bad_dicts_raise_clear_errors(d, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.method_from_dict(d)


def test_to_dict_refuses_a_non_method_and_a_foreign_class():
    with pytest.raises(jpeft.JpeftError, match=r"method_to_dict: expected a jpeft.Method"):
        jpeft.method_to_dict({"rank": 4})

    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class MyLoRA(jpeft.LoRA):
        pass

    with pytest.raises(jpeft.JpeftError, match=r"test_method_dict\..*MyLoRA is not a jpeft class"):
        jpeft.method_to_dict(MyLoRA(targets="q"))
