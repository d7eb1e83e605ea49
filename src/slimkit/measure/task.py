"""Task metrics for an encoder: a frozen head fit on the original model's embeddings.

The head is fit on the fp32 model's train-split embeddings and frozen: its test accuracy
on a variant's embeddings is what a user who keeps their downstream head sees.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression

from slimkit.measure.runners import Runner


class TokenizedTexts:
    """Texts tokenized once, then served in length-sorted padded batches."""

    def __init__(self, tokenizer, texts: list[str], max_len: int):
        enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len)
        self.ids = enc["input_ids"]
        self.order = np.argsort([len(x) for x in self.ids], kind="stable")
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, batch_size: int):
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start:start + batch_size]
            width = max(len(self.ids[i]) for i in idx)
            input_ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                input_ids[row, : len(self.ids[i])] = self.ids[i]
                mask[row, : len(self.ids[i])] = 1
            yield idx, input_ids, mask


def embed(runner: Runner, data: TokenizedTexts, batch_size: int = 64, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Embeddings of every text, in the original order."""
    out: np.ndarray | None = None
    for idx, ids, mask in data.batches(batch_size):
        emb = np.asarray(runner(ids, mask, np.zeros_like(ids)), dtype=np.float32)
        if out is None:
            out = np.zeros((len(data), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
        if progress:
            progress(len(idx))
    assert out is not None
    return out


def fit_head(train_emb: np.ndarray, train_labels: np.ndarray, seed: int = 0) -> LogisticRegression:
    """The downstream head: logistic regression, fit on train-split embeddings only."""
    head = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    return head.fit(train_emb, train_labels)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return (an * bn).sum(1)


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    n = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    sim = n @ n.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def task_metrics(
    frozen_head: LogisticRegression,
    ref_test: np.ndarray,
    ref_nn: np.ndarray,
    test_emb: np.ndarray,
    test_labels: np.ndarray,
    train_emb: np.ndarray | None,
    train_labels: np.ndarray,
    baseline_accuracy: float | None,
) -> dict[str, float | None]:
    """Frozen-head and re-fit accuracy, cosine to the fp32 embeddings, neighbour agreement."""
    acc = float((frozen_head.predict(test_emb) == test_labels).mean())
    refit = None
    if train_emb is not None:
        refit = float((fit_head(train_emb, train_labels).predict(test_emb) == test_labels).mean())
    cos = cosine_rows(test_emb, ref_test)
    return {
        "frozen_head": acc,
        "frozen_head_drop_pp": None if baseline_accuracy is None else (baseline_accuracy - acc) * 100.0,
        "refit": refit,
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "nn_agreement": float((nearest_neighbours(test_emb) == ref_nn).mean()),
    }
