"""Task metrics on synthetic embeddings, neighbours, tokenized batches and embedding."""

from __future__ import annotations

import numpy as np
import pytest

from slimkit.measure.task import (
    TokenizedTexts,
    cosine_rows,
    embed,
    fit_head,
    nearest_neighbours,
    task_metrics,
)


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two well separated Gaussian classes in 16 dimensions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    centres = np.where(labels[:, None] == 1, 3.0, -3.0) * np.eye(16)[0]
    return (centres + rng.normal(size=(n, 16))).astype(np.float32), labels


@pytest.fixture(scope="module")
def setup():
    train, train_y = blobs(200, seed=0)
    test, test_y = blobs(100, seed=1)
    head = fit_head(train, train_y)
    baseline = float((head.predict(test) == test_y).mean())
    return head, train, train_y, test, test_y, baseline, nearest_neighbours(test)


def test_identical_embeddings(setup):
    head, train, train_y, test, test_y, baseline, ref_nn = setup
    m = task_metrics(head, test, ref_nn, test.copy(), test_y, train, train_y, baseline)
    assert set(m) == {"frozen_head", "frozen_head_drop_pp", "refit", "cosine_mean", "cosine_min", "nn_agreement"}
    assert baseline >= 0.95
    assert m["frozen_head"] == baseline
    assert m["frozen_head_drop_pp"] == 0.0
    assert m["refit"] == baseline  # the same data and seed give the same head
    assert m["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["nn_agreement"] == 1.0


def test_no_train_embeddings_and_no_baseline(setup):
    head, _, train_y, test, test_y, _, ref_nn = setup
    m = task_metrics(head, test, ref_nn, test, test_y, None, train_y, None)
    assert m["refit"] is None and m["frozen_head_drop_pp"] is None


def test_noisy_embeddings_score_lower(setup):
    head, train, train_y, test, test_y, baseline, ref_nn = setup
    rng = np.random.default_rng(2)
    noisy = test + rng.normal(scale=1.0, size=test.shape).astype(np.float32)
    m = task_metrics(head, test, ref_nn, noisy, test_y, train, train_y, baseline)
    # Measured: cosine mean 0.76, min 0.32, neighbour agreement 0.11, accuracy 0.99 -> 0.96.
    assert 0.6 < m["cosine_mean"] < 0.9
    assert m["cosine_min"] < 0.5
    assert m["nn_agreement"] < 0.3
    assert m["frozen_head"] < baseline
    assert m["frozen_head_drop_pp"] == pytest.approx((baseline - m["frozen_head"]) * 100)


def test_reflected_embeddings_keep_neighbours_but_lose_the_frozen_head(setup):
    head, train, train_y, test, test_y, baseline, ref_nn = setup
    flipped = test.copy()
    flipped[:, 0] *= -1  # a reflection: the class direction is reversed
    m = task_metrics(head, test, ref_nn, flipped, test_y, train, train_y, baseline)
    assert m["nn_agreement"] == 1.0  # a reflection keeps every angle between rows
    assert m["frozen_head"] <= 0.05  # but the head's predictions flip (measured 0.01)
    assert m["frozen_head_drop_pp"] >= 90.0
    assert m["cosine_mean"] < 0.5


class ThresholdHead:
    def predict(self, x):
        return (x[:, 0] > 0).astype(int)


def test_negated_embeddings_keep_neighbours_but_cosine_is_minus_one():
    ref = np.array([[1.0, 0.2], [0.9, 0.3], [-0.5, 1.0], [-0.4, 1.1]], dtype=np.float32)
    labels = np.array([1, 1, 0, 0])
    m = task_metrics(ThresholdHead(), ref, nearest_neighbours(ref), -ref, labels, None, labels, 1.0)
    assert m["cosine_mean"] == pytest.approx(-1.0) and m["cosine_min"] == pytest.approx(-1.0)
    assert m["nn_agreement"] == 1.0
    assert m["frozen_head"] == 0.0
    assert m["frozen_head_drop_pp"] == pytest.approx(100.0)


def test_nearest_neighbours_hand_made():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [10.0, 0.5]])
    # Cosine, not distance: row 4 is long but points almost along row 0.
    assert nearest_neighbours(emb).tolist() == [4, 4, 3, 2, 0]


def test_nearest_neighbours_never_returns_self_even_for_duplicates():
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert nearest_neighbours(emb).tolist() == [1, 0, 0]  # a tie goes to the first row


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, -1.0, 0.0])


class FakeTokenizer:
    pad_token_id = 0

    def __call__(self, texts, add_special_tokens, truncation, max_length):
        assert add_special_tokens and truncation
        ids = [[101, *[len(w) for w in t.split()], 102][:max_length] for t in texts]
        return {"input_ids": ids}


def test_tokenized_texts_batches_are_length_sorted_and_padded():
    texts = ["a bb ccc dddd", "e", "ff gg", "a b c d e f g h i j"]
    data = TokenizedTexts(FakeTokenizer(), texts, max_len=6)
    assert len(data) == 4
    batches = list(data.batches(2))
    assert [idx.tolist() for idx, _, _ in batches] == [[1, 2], [0, 3]]
    idx, ids, mask = batches[0]
    assert ids.tolist() == [[101, 1, 102, 0], [101, 2, 2, 102]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    _, ids, mask = batches[1]
    assert ids.tolist() == [[101, 1, 2, 3, 4, 102], [101, 1, 1, 1, 1, 1]]  # truncated to 6
    assert ids.dtype == np.int64 and mask.dtype == np.int64


def test_embed_returns_rows_in_the_original_order():
    texts = ["a bb ccc dddd", "e", "ff gg", "a b c", "zz"]
    data = TokenizedTexts(FakeTokenizer(), texts, max_len=16)
    seen = []

    def runner(ids, mask, token_type_ids):
        assert not token_type_ids.any()
        # Embedding: [number of real tokens, sum of ids].
        return np.stack([mask.sum(1), (ids * mask).sum(1)], 1).astype(np.float64)

    out = embed(runner, data, batch_size=2, progress=seen.append)
    assert out.dtype == np.float32 and out.shape == (5, 2)
    expected_len = [len(t.split()) + 2 for t in texts]
    assert out[:, 0].tolist() == expected_len
    assert out[:, 1].tolist() == [203 + sum(len(w) for w in t.split()) for t in texts]
    assert seen == [2, 2, 1]
