"""Loads Hugging Face PyTorch-format checkpoints into ``transformers`` Flax models, without torch.

A PyTorch-format model directory holds ``config.json`` and ``model.safetensors``. The tensors are
read with the ``safetensors`` package's NumPy API and renamed to the Flax tree with NumPy alone,
by the rules of ``transformers.modeling_flax_pytorch_utils``:

* ``<m>.weight`` becomes ``<m>/scale`` when the Flax module has a ``scale`` (LayerNorm), else
  ``<m>/embedding`` when it has an ``embedding``, else, when the Flax module has no ``weight`` of
  its own (Llama's RMSNorm has), ``<m>/kernel``, transposed: a torch ``Linear`` stores ``(out, in)``
  and Flax's ``Dense`` ``(in, out)``; GPT-2's torch ``Conv1D`` stores ``(in, out)`` and its Flax
  twin ``(out, in)``, so it is transposed too. 4-D convolution kernels go from ``(out, in, h, w)``
  to ``(h, w, in, out)``.
* ``gamma`` and ``beta`` (old LayerNorm names) become ``scale`` and ``bias``.
* The task-head models nest the bare model under ``base_model_prefix`` (``bert``,
  ``transformer``, ``model``); the prefix is added or stripped as the two sides need.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft._errors import JpeftError
from jpeft._tree import PyTree
from jpeft.models._safetensors_files import read_config, read_safetensors, read_shards

FAMILIES = ("bert", "roberta", "gpt2", "llama", "bart")
"""The ``model_type`` values whose conversion the tests check."""

_BUFFERS = re.compile(r"(.*\.)?(position_ids|masked_bias|inv_freq)|(.*\.)?attn\.bias")
"""Torch buffers with no Flax parameter: dropped."""

_TIED = re.compile(r"(.*\.)?(lm_head|(encoder|decoder)\.embed_tokens)\.weight")
"""Torch copies of a tied embedding; dropped when they equal an embedding the Flax tree holds."""

_OWNER = "jpeft.models.load_hf_safetensors"


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _rename(key: tuple[str, ...], x: np.ndarray, ref: Mapping[tuple[str, ...], Any], prefix: str) -> tuple:
    """One torch name and array to their Flax name and layout (``ref``: the Flax shapes)."""

    def has(k: tuple[str, ...]) -> bool:
        return k in ref or (prefix,) + k in ref

    head, last = key[:-1], key[-1]
    if last in ("weight", "gamma") and has(head + ("scale",)):
        return head + ("scale",), x
    if last == "weight" and has(head + ("embedding",)):
        return head + ("embedding",), x
    if last == "weight" and not has(key):
        if x.ndim == 4:
            return head + ("kernel",), np.transpose(x, (2, 3, 1, 0))
        return head + ("kernel",), x.T
    if last == "beta":
        return head + ("bias",), x
    return key, x


def convert(
    state: Mapping[str, np.ndarray], shapes: PyTree, prefix: str, *, owner: str = _OWNER, check_finite: bool = True
) -> PyTree:
    """Converts a torch-format state dict to a Flax parameter tree with NumPy only.

    Args:
      state: torch parameter names (``'encoder.layer.0.attention.self.query.weight'``) to arrays.
      shapes: the Flax parameter tree the result must match, of arrays or ``ShapeDtypeStruct`` s
        (such as ``model.params_shape_tree``).
      prefix: the model's ``base_model_prefix``; added or stripped as the two sides need.
      owner: the public function to name in errors.
      check_finite: refuse tensors holding NaN or Inf, or values beyond the range of the Flax dtype
        they are cast to (float64 above float32's maximum: inf once cast); ``False`` skips both
        scans, for a huge model whose weights you trust.

    Returns:
      A nested dict with the structure of ``shapes``, each leaf a NumPy array of its shape and
      dtype. Leaves the state dict does not hold are ``None``.

    Raises:
      JpeftError: naming the unexpected keys, the keys whose shape differs from the Flax one, a
        non-float tensor (int, bool) for a float parameter, or one holding NaN or Inf.

    Example:
      >>> import numpy as np
      >>> from jpeft.models import convert
      >>> state = {"dense.weight": np.ones((3, 2)), "norm.weight": np.ones(3), "norm.bias": np.zeros(3)}
      >>> shapes = {"dense": {"kernel": np.zeros((2, 3))}, "norm": {"scale": np.zeros(3), "bias": np.zeros(3)}}
      >>> tree = convert(state, shapes, prefix="model")
      >>> tree["dense"]["kernel"].shape, sorted(tree["norm"])
      ((2, 3), ['bias', 'scale'])
    """
    ref = _flat(shapes)
    has_prefix_flax = any(k[0] == prefix for k in ref)
    has_prefix_torch = any(k.split(".")[0] == prefix for k in state)
    out: dict[tuple[str, ...], np.ndarray] = {}
    source: dict[tuple[str, ...], str] = {}
    unexpected, wrong, tied, dtypes, nonfinite = [], [], [], [], []
    for name in sorted(state):
        x = np.asarray(state[name])
        key = tuple(name.split("."))
        if not has_prefix_flax and has_prefix_torch and key[0] == prefix:
            key = key[1:]
        flax_key, y = _rename(key, x, ref, prefix)
        if has_prefix_flax and not has_prefix_torch and (prefix,) + flax_key in ref:
            flax_key = (prefix,) + flax_key
        if flax_key not in ref:
            if _BUFFERS.fullmatch(name):
                continue
            if _TIED.fullmatch(name):
                tied.append((name, x))
                continue
            unexpected.append(name)
            continue
        want = ref[flax_key]
        if tuple(y.shape) != tuple(want.shape):
            wrong.append(f"{name} {tuple(x.shape)} -> {'/'.join(flax_key)} expects {tuple(want.shape)}")
            continue
        if jnp.issubdtype(want.dtype, jnp.floating) and not jnp.issubdtype(y.dtype, jnp.floating):
            dtypes.append(f"{name} {y.dtype} -> {'/'.join(flax_key)} {jnp.dtype(want.dtype).name}")
            continue
        if check_finite and jnp.issubdtype(y.dtype, jnp.floating) and not np.isfinite(y).all():
            nonfinite.append(f"{name} ({int((~np.isfinite(y)).sum())} of {y.size})")
            continue
        with np.errstate(over="ignore"):  # float64 beyond float32's range: refused below
            y = y.astype(want.dtype)
        if check_finite and jnp.issubdtype(want.dtype, jnp.floating) and not np.isfinite(y).all():  # overflowed
            nonfinite.append(f"{name} ({int((~np.isfinite(y)).sum())} beyond {jnp.dtype(want.dtype).name}'s range)")
            continue
        out[flax_key] = y
        source[flax_key] = name
    embeddings = [v for k, v in out.items() if k[-1] == "embedding"]
    for name, x in tied:
        if not any(e.shape == x.shape and np.array_equal(e, x.astype(e.dtype)) for e in embeddings):
            unexpected.append(f"{name} (not equal to any embedding, so not a tied copy)")
    if nonfinite:
        raise JpeftError(
            f"{owner}: {len(nonfinite)} tensors of the checkpoint hold NaN or Inf: {', '.join(nonfinite[:8])}. The "
            "file is damaged or the model diverged; download it again (check_finite=False skips this scan)."
        )
    if unexpected or wrong or dtypes:
        lines = [f"{owner}: the checkpoint does not fit the Flax model."]
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if wrong:
            lines.append(f"Shape mismatches ({len(wrong)}): {'; '.join(wrong[:8])}")
        if dtypes:
            lines.append(f"Non-float tensors for float parameters ({len(dtypes)}): {'; '.join(dtypes[:8])}")
        lines.append("Check that config.json belongs to this checkpoint, or pass the right model_class.")
        raise JpeftError("\n".join(lines))
    return _unflat({k: out.get(k) for k in ref})


def _model_class(config: Any, model_class: Any) -> type:
    import transformers

    if model_class is not None:
        cls = getattr(transformers, model_class, None) if isinstance(model_class, str) else model_class
        if not isinstance(cls, type) or not issubclass(cls, transformers.FlaxPreTrainedModel):
            raise JpeftError(
                f"{_OWNER}(model_class={model_class!r}): expected a transformers Flax model class or its "
                "name, such as 'FlaxBertForSequenceClassification'."
            )
        return cls
    if config.model_type not in FAMILIES:
        raise JpeftError(
            f"{_OWNER}: config.json has model_type={config.model_type!r}; the supported families are "
            f"{FAMILIES}. Pass model_class=... (a transformers Flax class) to try another family."
        )
    names = [f"Flax{a}" for a in (getattr(config, "architectures", None) or [])]
    for name in names:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.FlaxAutoModel._model_mapping[type(config)]


def load_hf_safetensors(
    directory: str,
    *,
    model_class: Any = None,
    dtype: Any = jnp.float32,
    key: jax.Array | None = None,
    check_finite: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Loads an HF PyTorch-format model directory into a ``transformers`` Flax model, without torch.

    Reads ``config.json`` and ``model.safetensors`` (or the shards that
    ``model.safetensors.index.json`` lists) with safetensors' NumPy API, builds the Flax class of the
    config's ``architectures`` (``BertModel`` gives ``FlaxBertModel``) with ``_do_init=False`` and
    converts names and layouts: torch ``Linear`` ``(out, in)`` to Flax ``(in, out)`` kernels,
    embeddings, LayerNorm ``weight``/``bias`` to ``scale``/``bias``, GPT-2's ``Conv1D``. The result
    has exactly the structure, shapes and dtypes of the model's ``init``. Torch-only buffers
    (``position_ids``, GPT-2's ``attn.bias``, rotary ``inv_freq``) and tied copies of an embedding
    (``lm_head.weight``, BART's ``embed_tokens``) are dropped.

    Args:
      directory: a directory with ``config.json`` and ``model.safetensors`` (or its sharded form).
      model_class: a ``transformers`` Flax class, or its name, to build instead of the config's
        architecture; for example ``'FlaxBertForSequenceClassification'`` over a bare BERT
        checkpoint, whose head is then missing (see ``key``).
      dtype: the computation dtype of the Flax model. Parameters keep the ``init`` dtypes
        (float32), whatever the checkpoint stores.
      key: a ``jax.random`` key that initialises parameters the checkpoint lacks (a new task
        head). Without it, missing parameters are an error.
      check_finite: refuse weights holding NaN or Inf; ``False`` skips this pass over every weight,
        for a huge model whose files you trust.

    Returns:
      ``(model, params)``: the Flax model (built with ``_do_init=False``, so it holds no
      parameters) and its ``params`` collection as a nested dict of ``jax.Array`` s. Run it with
      ``model(**inputs, params=params)`` or ``model.module.apply({'params': params}, ...)``.

    Raises:
      JpeftError: if a file is missing or unreadable (not UTF-8 JSON, no ``model_type``, an index
        without a ``weight_map`` or naming a shard outside the directory, a tensor in two shards),
        the family is not supported, or the checkpoint does not fit the model (naming unexpected,
        missing or misshapen keys, a non-float tensor for a float parameter, NaN or Inf).

    Example:
      >>> import jpeft
      >>> model, params = jpeft.models.load_hf_safetensors("all-MiniLM-L6-v2/")  # doctest: +SKIP
      >>> try:
      ...   jpeft.models.load_hf_safetensors("/nonexistent")
      ... except jpeft.JpeftError as e:
      ...   print(e)
      jpeft.models.load_hf_safetensors: '/nonexistent/config.json' does not exist. Pass the directory of an HF model saved with save_pretrained (config.json and model.safetensors).
    """
    config_path = os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(config_path):
        raise JpeftError(
            f"{_OWNER}: {config_path!r} does not exist. Pass the directory of an HF model saved with "
            "save_pretrained (config.json and model.safetensors)."
        )
    config = read_config(config_path)
    cls = _model_class(config, model_class)
    index_path = weights_path + ".index.json"
    if not os.path.isfile(weights_path) and os.path.isfile(index_path):  # a sharded checkpoint
        state = read_shards(directory, index_path)
    else:
        state = read_safetensors(weights_path, _OWNER)
    with jax.numpy_rank_promotion("allow"):  # HF's own init code relies on implicit rank promotion
        model = cls(config, dtype=dtype, _do_init=False)
        shapes = model.params_shape_tree
        tree = convert(state, shapes, cls.base_model_prefix, check_finite=check_finite)
        flat = _flat(tree)
        missing = [k for k, v in flat.items() if v is None]
        if missing:
            if key is None:
                names = ", ".join("/".join(k) for k in missing[:8])
                raise JpeftError(
                    f"{_OWNER}: {weights_path!r} lacks {len(missing)} parameters of {cls.__name__}: {names}. "
                    "Pass key=jax.random.key(0) to initialise them randomly (a new task head), or pick "
                    "the model_class the checkpoint was saved from."
                )
            fresh = _flat(model.init_weights(key, model.input_shape))
            flat.update({k: fresh[k] for k in missing})
    return model, _unflat({k: jnp.asarray(v) for k, v in flat.items()})
