"""The text side of a run: real sentences at a fixed length, and a frozen downstream head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slimkit.measure.inputs import fixed_length_batch
from slimkit.measure.task import TokenizedTexts, embed, fit_head, nearest_neighbours, task_metrics
from slimkit.measure.workload import Progress, Runner
from slimkit.zoo.tasks import TextClassificationData, load_task

# Calibration sentences and the accuracy harness are cut at this many tokens.
MAX_TOKENS = 128


@dataclass
class TextWorkload:
    """A text-classification task for a sentence encoder with a tokenizer."""

    data: TextClassificationData
    tokenizer: Any
    max_seq_len: int | None
    seq_len: int
    kind: str = "text"

    @classmethod
    def from_spec(cls, task: Any, model: Any, seq_len: int) -> TextWorkload:
        data = load_task(task.source, task.text_column, task.label_column).limited(task.train_limit, task.test_limit)
        return cls(data, model.tokenizer, model.max_seq_len, seq_len)

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def train_texts(self) -> list[str]:
        return self.data.train_texts

    @property
    def train_labels(self) -> np.ndarray:
        return self.data.train_labels

    def timing_feed(self, batch: int) -> dict[str, np.ndarray]:
        return fixed_length_batch(self.tokenizer, self.data.test_texts, batch, self.seq_len, self.max_seq_len)

    def serve_feed(self) -> dict[str, np.ndarray]:
        return fixed_length_batch(self.tokenizer, self.data.test_texts, 1, min(MAX_TOKENS, self.seq_len), self.max_seq_len)

    def calibration(self, n: int, framework: str = "onnx") -> list[dict[str, np.ndarray]]:
        """Single sentences from the train split, as static quantization calibrates on them."""
        feeds = []
        for text in self.data.train_texts[:n]:
            enc = self.tokenizer(text, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
            ids = enc["input_ids"].astype(np.int64)
            feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
        return feeds

    def training_example(self, batch_size: int):
        """One batch of train texts at the longest length distillation uses, and a loss of
        the embeddings, for planning activation checkpointing."""
        feed = fixed_length_batch(self.tokenizer, self.data.train_texts, batch_size, MAX_TOKENS, self.max_seq_len)
        return self.torch_inputs(feed, "cpu"), lambda emb: emb.float().pow(2).mean()

    def torch_inputs(self, feed: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(device) for k, v in feed.items()}

    def count_inputs(self, feed: dict[str, np.ndarray]) -> tuple:
        ids = torch.from_numpy(feed["input_ids"][:1])
        return ids, torch.ones_like(ids), torch.zeros_like(ids)

    def accuracy(self, runners: dict[str, Runner], baseline: str,
                 progress: Callable[[str, int], Progress]) -> dict[str, dict]:
        """Frozen-head accuracy: a head fit on ``baseline``'s train embeddings, applied to each variant's."""
        data = self.data
        train = TokenizedTexts(self.tokenizer, data.train_texts, MAX_TOKENS)
        test = TokenizedTexts(self.tokenizer, data.test_texts, MAX_TOKENS)
        ref_test = head = ref_nn = base_acc = None
        out = {}
        for name in [baseline, *(n for n in runners if n != baseline)]:
            advance = progress(f"accuracy, {name}", len(train) + len(test))
            tr = embed(runners[name], train, progress=advance)
            te = embed(runners[name], test, progress=advance)
            if name == baseline:
                ref_test = te
                head = fit_head(tr, data.train_labels)
                ref_nn = nearest_neighbours(ref_test)
                base_acc = float((head.predict(te) == data.test_labels).mean())
            out[name] = task_metrics(head, ref_test, ref_nn, te, data.test_labels, tr, data.train_labels, base_acc)
        return out

    def info(self) -> dict[str, Any]:
        return {"name": self.data.name, "kind": self.kind, "train_size": len(self.data.train_texts),
                "test_size": len(self.data.test_texts)}
