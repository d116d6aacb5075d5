"""``python -m experiments.intrinsic``'s pieces without the model: the frozen label head, padding, shares, codes, arguments."""

import doctest

import numpy as np
import pytest

import jpeft
from experiments import intrinsic


def test_docstring_examples():
    assert doctest.testmod(intrinsic, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_label_head_is_a_scaled_cosine_and_padding_never_wins():
    rng = np.random.default_rng(0)
    labels, emb = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    head = intrinsic.pad_head(intrinsic.label_head(labels, scale=20.0))
    got = np.asarray(intrinsic.logits(head, emb, normalize=True))
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        labels / np.linalg.norm(labels, axis=1, keepdims=True)
    ).T
    assert got.shape == (5, intrinsic.CLASSES)
    np.testing.assert_allclose(got[:, :3], 20.0 * cos, rtol=1e-5, atol=1e-5)
    assert (got[:, 3:] < -1e8).all() and (got.argmax(1) < 3).all()
    # The trained head's logits are affine and unnormalised.
    plain = {"kernel": np.ones((8, 2), np.float32), "bias": np.array([1.0, -1.0], np.float32)}
    np.testing.assert_allclose(
        np.asarray(intrinsic.logits(plain, emb, normalize=False)), emb.sum(1, keepdims=True) + [1.0, -1.0], rtol=1e-5
    )


def test_shares_raw_ratio_and_gain_over_the_floor():
    assert intrinsic.shares(0.9, 0.9, 0.6) == {"raw": 1.0, "gain": 1.0}
    s = intrinsic.shares(0.6, 0.8, 0.6)  # IPT at the floor keeps none of the gain, though its raw ratio is 75 %
    assert s["raw"] == pytest.approx(0.75) and s["gain"] == pytest.approx(0.0)
    assert np.isnan(intrinsic.shares(0.7, 0.6, 0.65)["gain"])  # PT not above the floor: no gain to share


@pytest.mark.parametrize("kind", ["pca", "autoencoder"])
def test_codes_are_the_projection_coordinates(kind):
    rng = np.random.default_rng(1)
    prompts = (rng.normal(size=(12, 3)) @ rng.normal(size=(3, 8))).reshape(12, 2, 4).astype(np.float32)
    proj = jpeft.fit_intrinsic_projection(prompts, 3, kind=kind, steps=100, lr=3e-2)
    recon = np.stack([np.asarray(proj.up(c)) for c in intrinsic.codes(proj, prompts)])
    err = np.mean((recon - prompts) ** 2) / np.mean((prompts - prompts.mean(0)) ** 2)
    assert err < (1e-6 if kind == "pca" else 0.2)


def test_the_target_must_not_be_a_source(capsys):
    with pytest.raises(SystemExit):
        intrinsic.parse_args(["--sources", "bbc", "imdb", "--target", "imdb"])
    assert "unseen task must not be one of --sources" in capsys.readouterr().err
    args = intrinsic.parse_args([])
    assert (args.sources, args.target, args.head, args.dims) == (["bbc", "rt"], "imdb", "label", [5, 20, 100])


@pytest.mark.parametrize("kinds", [("pca",), ("pca", "autoencoder")])
def test_plot_of_a_partial_and_a_full_report(tmp_path, kinds):
    pytest.importorskip("matplotlib")
    share = {"seen": {"raw": 0.98, "gain": 0.8}, "unseen": {"raw": 1.0, "gain": 1.1}}
    row = {"floor": 0.6, "prompt_tuning_curves": [[[25, 0.62], [50, 0.66]]]}
    result = {
        "recovered": {k: {"5": share, "20": share} for k in kinds},
        "groups": {"seen": ["bbc"], "unseen": ["imdb"]},
        "accuracy": {"bbc": row, "imdb": row},
        "args": {"head": "label"},
    }
    path = intrinsic.save_plot(result, str(tmp_path / "intrinsic.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
