"""jpeft.save / jpeft.restore on damaged, edited and unusual checkpoints (issue 17 findings 3, 4, 7, 8).

Each case damages or edits a real checkpoint the way a user, a crash or a full disk would, and
asserts a ``jpeft.JpeftError`` that names the file and the problem, or a correct result; none may
load silently wrong values or surface a raw traceback from orbax, tensorstore, json or Python.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jpeft
from tests.io.test_checkpoint import ROOT, assert_trees_equal, small


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One pristine checkpoint (step 1, with an Adam state); each test edits a copy."""
    path = tmp_path_factory.mktemp("pristine")
    method, _, peft = small(1)
    state = jpeft.optimizer(optax.adam(1e-3), method, peft).init(peft)
    jpeft.save(path, method, peft, step=1, opt_state=state)
    return path


def copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "ck")
    return tmp_path / "ck"


def edit_meta(path: Path, change) -> None:
    file = path / "step_1" / "meta" / "metadata"
    meta = json.loads(file.read_text())
    change(meta)
    file.write_text(json.dumps(meta))


def adam_template(m, p):
    return jpeft.optimizer(optax.adam(1e-3), m, p).init(p)


# --- finding 3: the optimizer state's tree structure -----------------------------------------------
@pytest.mark.parametrize(
    "saved_tx, template_tx, node",
    [
        (optax.sgd(1e-3, momentum=0.9), optax.rmsprop(1e-3), "TraceState"),
        (optax.adam(1e-3), optax.adabelief(1e-3), "ScaleByAdamState"),
    ],
    ids=["sgd_momentum_into_rmsprop", "adam_into_adabelief"],
)
def test_an_optimizer_template_of_another_structure_is_refused(tmp_path, saved_tx, template_tx, node):
    method, params, peft = small(1)
    jpeft.save(tmp_path, method, peft, step=1, opt_state=jpeft.optimizer(saved_tx, method, peft).init(peft))
    template = lambda m, p: jpeft.optimizer(template_tx, m, p).init(p)  # noqa: E731 - same leaf shapes
    with pytest.raises(
        jpeft.JpeftError, match=rf"template's tree structure is not the saved one in '.*step_1/meta/metadata'.*{node}"
    ):
        jpeft.restore(tmp_path, params, opt_state=template)
    right = lambda m, p: jpeft.optimizer(saved_tx, m, p).init(p)  # noqa: E731
    assert jpeft.restore(tmp_path, params, opt_state=right).opt_state is not None


# --- finding 4: an edited method or leaf list is checked against jpeft.apply -------------------------
def test_an_edited_method_or_leaf_list_is_refused(saved, tmp_path):
    _, params, _ = small(1)
    leaves = r"the leaves listed in '.*step_1/meta/metadata' are not those LoRA makes and trains on params"
    cases = [
        (
            lambda m: m["method"]["fields"].update(rank=4),
            rf"(?s){leaves}.*lora_a: expected \(6, 4\) float32, found \(6, 2\)",
        ),
        (
            lambda m: m["method"]["fields"].update(targets=["head"]),
            rf"(?s){leaves}.*head/__jpeft__/default/lora_a: expected",
        ),
        (
            lambda m: m["params"][1].__setitem__(2, "int32"),
            rf"(?s){leaves}.*lora_a: expected \(6, 2\) float32, found \(6, 2\) int32",
        ),
        (
            lambda m: m["params"][1].__setitem__(1, [6, 3]),
            rf"(?s){leaves}.*lora_a: expected \(6, 2\) float32, found \(6, 3\)",
        ),
    ]
    for i, (change, message) in enumerate(cases):
        path = shutil.copytree(saved, tmp_path / str(i))
        edit_meta(path, change)
        with pytest.raises(jpeft.JpeftError, match=message):
            jpeft.restore(path, params)


def test_an_edited_path_onto_a_frozen_base_leaf_is_refused(tmp_path):
    params = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, "head": {"bias": jnp.zeros(4)}}
    method = jpeft.LoRA(targets=["q"], rank=2, extra_trainable=r"head/bias")
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    peft["head"]["bias"] = jnp.full(4, 7.0)
    jpeft.save(tmp_path, method, peft, step=1)
    edit_meta(tmp_path, lambda m: m["params"][0].__setitem__(0, "q/bias"))  # same shape, a frozen leaf
    with pytest.raises(
        jpeft.JpeftError,
        match=r"(?s)not those LoRA makes.*head/bias: expected \(4,\) float32, found missing"
        r".*q/bias: expected missing, found \(4,\) float32.*nothing was loaded",
    ):
        jpeft.restore(tmp_path, params)


# --- finding 7: damaged files are JpeftErrors naming the file ------------------------------------------
def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def _data_files(path: Path) -> list[Path]:
    item = path / "step_1" / "params"
    return sorted(item.glob("d/*")) + [item / "manifest.ocdbt"]


META = r"the checkpoint metadata '.*step_1/meta/metadata'"
DAMAGE = {
    "meta_missing_key": (lambda p: edit_meta(p, lambda m: m.pop("adapter")), rf"{META} has no 'adapter' key"),
    "meta_wrong_type": (
        lambda p: edit_meta(p, lambda m: m.update(params="x")),
        rf"{META}: 'params' must be a list of \[path",
    ),
    "meta_bad_shape": (
        lambda p: edit_meta(p, lambda m: m["params"][0].__setitem__(1, [-1])),
        rf"{META}: 'params' must be",
    ),
    "meta_bad_dtype": (
        lambda p: edit_meta(p, lambda m: m["params"][0].__setitem__(2, "float99")),
        rf"{META}: 'params' must be",
    ),
    "meta_truncated": (lambda p: _truncate(p / "step_1" / "meta" / "metadata"), rf"{META} is not valid JSON"),
    "meta_not_object": (lambda p: (p / "step_1" / "meta" / "metadata").write_text("[1]"), rf"{META} holds a list"),
    "meta_other_step": (
        lambda p: edit_meta(p, lambda m: m.update(step=2)),
        rf"{META} says step 2, but it is in the directory of step 1",
    ),
    "meta_deleted": (lambda p: (p / "step_1" / "meta" / "metadata").unlink(), rf"{META} is missing"),
    "params_item_deleted": (
        lambda p: shutil.rmtree(p / "step_1" / "params"),
        r"the checkpoint item '.*step_1/params' is missing",
    ),
    "opt_item_deleted": (
        lambda p: shutil.rmtree(p / "step_1" / "opt_state"),
        r"the checkpoint item '.*step_1/opt_state' is missing",
    ),
    "array_bit_flip": (lambda p: [_flip(f) for f in _data_files(p)], r"step_1(/params)?' (has damaged|failed)"),
    "array_truncated": (lambda p: [_truncate(f) for f in _data_files(p)], r"step_1(/params)?' (has damaged|failed)"),
    "item_metadata_truncated": (
        lambda p: _truncate(p / "step_1" / "params" / "_METADATA"),
        r"'.*step_1/params' has damaged",
    ),
    "unknown_module": (
        lambda p: edit_meta(p, lambda m: m["method"].update(__dataclass__="jpeft.methods._gone:LoRAGone")),
        r"the checkpoint's LoRAGone is a jpeft.methods._gone.LoRAGone, which jpeft .* does not define",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_raises_a_clear_error(saved, tmp_path, damage):
    path = copy(saved, tmp_path)
    do, message = DAMAGE[damage]
    do(path)
    _, params, _ = small(1)
    with pytest.raises(jpeft.JpeftError, match=message):
        jpeft.restore(path, params, opt_state=adam_template)


def test_bad_steps_and_a_step_007_directory(saved, tmp_path):
    path = copy(saved, tmp_path)
    _, params, peft = small(1)
    for step in (True, 1.0, -1, "1"):
        with pytest.raises(jpeft.JpeftError, match=r"restore\(step=.*\): step must be an int >= 0, or None"):
            jpeft.restore(path, params, step=step)
    assert_trees_equal(jpeft.restore(path, params, step=np.int64(1)).params, peft)
    (path / "step_1").rename(path / "step_007")
    assert jpeft.io.steps(path) == []
    with pytest.raises(
        jpeft.JpeftError,
        match=r"no complete checkpoint under .*ignored \['step_007'\]: jpeft.save writes "
        r"step_<n> without leading zeros",
    ):
        jpeft.restore(path, params)
    with pytest.raises(
        jpeft.JpeftError, match=r"restore\(step=7\): no complete checkpoint of that step .*found steps \[\]"
    ):
        jpeft.restore(path, params, step=7)


def test_a_checkpoint_root_that_is_a_file(tmp_path):
    method, params, peft = small(1)
    file = tmp_path / "ck"
    file.write_text("not a directory")
    with pytest.raises(jpeft.JpeftError, match=r"save: the checkpoint root '.*ck' is a file, not a directory"):
        jpeft.save(file, method, peft, step=1)
    with pytest.raises(jpeft.JpeftError, match=r"restore: the checkpoint root '.*ck' is a file, not a directory"):
        jpeft.restore(file, params)
    with pytest.raises(jpeft.JpeftError, match=r"cannot create the checkpoint root '.*ck/sub'"):
        jpeft.save(file / "sub", method, peft, step=1)


# --- disk full: one error, nothing left behind, the previous checkpoint intact ------------------------
FULL = textwrap.dedent(
    """
    import resource, signal, sys
    import jax, jax.numpy as jnp, jpeft
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-size write fails with EFBIG instead of killing us
    params = {"q": {"kernel": jnp.ones((64, 512))}}
    method = jpeft.LoRA(targets=["q"], rank=64)
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    jpeft.save(sys.argv[1], method, peft, step=1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # the arrays (>100 kB) no longer fit
    try:
        jpeft.save(sys.argv[1], method, peft, step=2)
    except jpeft.JpeftError as e:
        print("JpeftError:", e)
    """
)


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    proc = subprocess.run(
        [sys.executable, "-c", FULL, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "JpeftError: jpeft.save: writing step 2 to '" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "failed: the disk is full (or a size quota was hit). Nothing was committed" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["step_1"]  # the temporaries were removed
    # The Python-side failure (orbax writing its JSON): the same error.
    import orbax.checkpoint as ocp

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    method, params, peft = small(1)
    monkeypatch.setattr(ocp.Checkpointer, "save", full)
    with pytest.raises(jpeft.JpeftError, match=r"writing step 3 to '.*step_3.jpeft-tmp-.*' failed: the disk is full"):
        jpeft.save(tmp_path, method, peft, step=3)
    assert jpeft.io.steps(tmp_path) == [1]


# --- finding 8 ---------------------------------------------------------------------------------------
def test_overwrite_replaces_a_symlinked_step_and_leaves_its_target(tmp_path):
    method, params, peft1 = small(1)
    jpeft.save(tmp_path / "elsewhere", method, peft1, step=1)
    (tmp_path / "ck").mkdir()
    os.symlink(tmp_path / "elsewhere" / "step_1", tmp_path / "ck" / "step_1")
    for seed in (2, 3):  # the old code wrote a full replacement and then failed on the link, every time
        peft = small(seed)[2]
        jpeft.save(tmp_path / "ck", method, peft, step=1, overwrite=True)
        assert_trees_equal(jpeft.restore(tmp_path / "ck", params).params, peft)
    assert os.listdir(tmp_path / "ck") == ["step_1"] and not os.path.islink(tmp_path / "ck" / "step_1")
    assert_trees_equal(jpeft.restore(tmp_path / "elsewhere", params).params, peft1)  # the link's target: untouched


def test_a_key_containing_a_slash_is_refused(tmp_path):
    params = {"a/b": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    method = jpeft.LoRA(targets=r"a/b", rank=2)
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    with pytest.raises(
        jpeft.JpeftError,
        match=r"save: the key path \['a/b', '__jpeft__', 'default', 'lora_a'\] has an "
        r"empty key or a key containing '/'",
    ):
        jpeft.save(tmp_path, method, peft, step=1)
    assert jpeft.io.steps(tmp_path) == []


def test_partition_specs_refuse_a_mesh_axis_used_twice():
    params = {"q": {"kernel": jnp.ones((8, 16))}}
    method = jpeft.LoRA(targets=["q"], rank=2)
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    for spec in (P("model", "model"), P(("data", "model"), "model")):
        with pytest.raises(
            jpeft.JpeftError, match=r"base_specs at 'q/kernel' is P\(.*\), which names a mesh axis more than once"
        ):
            jpeft.partition_specs(method, peft, {"q": {"kernel": spec}})
    assert jpeft.partition_specs(method, peft, {"q": {"kernel": P("data", "model")}})["q"]["kernel"] == P(
        "data", "model"
    )
