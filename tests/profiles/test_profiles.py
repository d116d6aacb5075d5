"""Tests of the architecture profiles against tiny HF Flax models."""

import dataclasses
import inspect
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jpeft import profiles
from jpeft.profiles._profile import module_paths
from tests import _hf_models

EXPECTED = {
    "bert": profiles.BERT,
    "roberta": profiles.ROBERTA,
    "gpt2": profiles.GPT2,
    "llama": profiles.LLAMA,
    "bart": profiles.BART,
}


@pytest.mark.parametrize("family", _hf_models.FAMILIES)
def test_detect_identifies_each_family(family):
    params = _hf_models.make(family).params
    assert profiles.detect(params) is EXPECTED[family]
    assert profiles.detect(flax.core.freeze(params)) is EXPECTED[family]
    assert profiles.detect({"params": params}) is EXPECTED[family]


def test_detect_identifies_bare_models():
    with jax.numpy_rank_promotion("allow"):
        bert = transformers.FlaxBertModel(transformers.BertConfig(**_hf_models._ENCODER), seed=0)
        roberta = transformers.FlaxRobertaModel(transformers.RobertaConfig(**_hf_models._ENCODER), seed=0)
    assert profiles.detect(bert.params) is profiles.BERT
    # A bare RoBERTa tree is BERT's, key for key; the BERT profile fits it.
    assert profiles.detect(roberta.params) is profiles.BERT
    gpt2 = _hf_models.make("gpt2").params["transformer"]
    assert profiles.detect(gpt2) is profiles.GPT2


def test_detect_strict_raises_with_examples_and_families():
    params = {"encoder": {"dense": {"kernel": jnp.zeros((2, 2))}}}
    with pytest.raises(profiles.ProfileError, match=r"'encoder/dense/kernel'.*\n.*bert, roberta, gpt2, llama, bart"):
        profiles.detect(params)
    assert profiles.detect(params, strict=False) is None
    assert issubclass(profiles.ProfileError, ValueError)


def test_detect_raises_when_several_families_match():
    params = {"a": _hf_models.make("gpt2").params, "b": _hf_models.make("llama").params}
    with pytest.raises(profiles.ProfileError, match=r"several families, \['gpt2', 'llama'\]"):
        profiles.detect(params, strict=False)


@pytest.mark.parametrize("family", _hf_models.FAMILIES)
def test_check_passes_on_each_family(family):
    profiles.check(EXPECTED[family], _hf_models.make(family).params)


def test_check_raises_with_field_regex_and_nearest_paths():
    params = _hf_models.make("gpt2").params
    broken = dataclasses.replace(profiles.GPT2, attn_out=r"(.*/)?h/\d+/attn/o_proj")
    with pytest.raises(profiles.ProfileError, match=r"attn_out='\(\.\*/\)\?h/\\\\d\+/attn/o_proj' matches none") as e:
        profiles.check(broken, params)
    nearest = re.search(r"Nearest: (.*)\.\n", str(e.value)).group(1).split(", ")
    assert len(nearest) == 5
    assert "'transformer/h/0/attn/c_proj'" in nearest


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("layer_pattern", r"(?:^|/)layer/(\d+)", "layer_pattern"),
        ("layouts", ((r"(.*/)?h/\d+/mlp/w1", "transposed"),), r"layouts\[0\]"),
        ("lora_default", ("qkv",), r"lora_default\[0\]"),
        ("cross_attention", r"(.*/)?crossattention", "cross_attention"),
    ],
)
def test_check_covers_every_kind_of_field(field, value, match):
    broken = dataclasses.replace(profiles.GPT2, **{field: value})
    with pytest.raises(profiles.ProfileError, match=match):
        profiles.check(broken, _hf_models.make("gpt2").params)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"name": ""}, "name must be a non-empty str"),
        ({"query": "(unclosed"}, r"query='\(unclosed' is not a valid regular expression"),
        ({"embedding": None}, "embedding must be a regex str; got NoneType"),
        ({"layer_pattern": r"(?:^|/)layer/\d+"}, "layer_pattern=.* must have exactly one group"),
        ({"inputs": ["input_ids"]}, "inputs must be a tuple of str"),
        ({"layouts": (("c_attn",),)}, "layouts must be a tuple of"),
        ({"layouts": (("(", "transposed"),)}, r"layouts\[0\]='\(' is not a valid"),
    ],
)
def test_profile_validates_fields(changes, match):
    with pytest.raises(profiles.ProfileError, match=match):
        dataclasses.replace(profiles.BERT, **changes)


def test_profiles_are_hashable_and_distinct():
    assert len({hash(p) for p in profiles.ALL}) == len(profiles.ALL)
    assert dataclasses.replace(profiles.BERT) == profiles.BERT


@pytest.mark.parametrize("family", _hf_models.FAMILIES)
def test_lora_default_suffixes_match_modules(family):
    paths = module_paths(_hf_models.make(family).params)
    for suffix in EXPECTED[family].lora_default:
        assert any(p == suffix or p.endswith("/" + suffix) for p in paths), suffix


@pytest.mark.parametrize("family", _hf_models.FAMILIES)
def test_layer_pattern_captures_every_layer(family):
    paths = module_paths(_hf_models.make(family).params)
    found = {m.group(1) for p in paths if (m := re.search(EXPECTED[family].layer_pattern, p))}
    assert found == {"0", "1"}


@pytest.mark.parametrize("family", _hf_models.FAMILIES)
def test_inputs_are_what_the_module_takes(family):
    model = _hf_models.make(family)
    takes = inspect.signature(type(model.model.module).__call__).parameters
    assert [name for name in takes if name in EXPECTED[family].inputs] == list(EXPECTED[family].inputs)
    assert set(model.inputs) == set(EXPECTED[family].inputs)
    assert model.logits(model.apply({"params": model.params}, **model.inputs)).dtype == jnp.float32


def test_gpt2_kernels_are_transposed():
    model = _hf_models.make("gpt2")
    hidden = model.model.config.n_embd
    attn = model.params["transformer"]["h"]["0"]["attn"]
    kernel, bias = attn["c_attn"]["kernel"], attn["c_attn"]["bias"]
    assert kernel.shape == (3 * hidden, hidden)
    layout = dict(profiles.GPT2.layouts)
    assert [v for k, v in layout.items() if re.fullmatch(k, "transformer/h/0/attn/c_attn")] == ["transposed"]

    # Capture the input to c_attn, and check its output is x @ kernel.T + bias: (out, in) storage.
    captured = {}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.path == ("transformer", "h", "0", "attn", "c_attn"):
            captured["x"], captured["y"] = args[0], out
        return out

    with flax.linen.intercept_methods(spy):
        model.apply({"params": model.params}, **model.inputs)
    expected = np.asarray(captured["x"]) @ np.asarray(kernel).T + np.asarray(bias)
    np.testing.assert_allclose(captured["y"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", _hf_models.FAMILIES)
def test_factory_matches_the_hf_wrapper(family):
    model = _hf_models.make(family)
    names = ("input_ids", "attention_mask", "decoder_input_ids")
    with jax.numpy_rank_promotion("allow"):
        reference = model.model(**{k: v for k, v in model.inputs.items() if k in names}, params=model.params)
    actual = model.logits(model.apply({"params": model.params}, **model.inputs))
    np.testing.assert_allclose(actual, reference.logits, rtol=1e-6, atol=1e-6)


def test_factory_bfloat16():
    model = _hf_models.make("llama", dtype=jnp.bfloat16)
    assert {x.dtype for x in flax.traverse_util.flatten_dict(model.params).values()} == {jnp.dtype(jnp.bfloat16)}
    assert model.logits(model.apply({"params": model.params}, **model.inputs)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="family must be one of"):
        _hf_models.make("t5")
