"""Distillation data from plain text: labels are not needed for embedding distillation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimkit.distill.trainer import DistillData
from slimkit.errors import DataError


def text_data(tokenizer, texts: list[str], max_len: int = 128, labels: np.ndarray | None = None) -> DistillData:
    """Tokenize ``texts`` once; each batch is cut to its longest sentence."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError("no text to distil on: the list is empty or holds only blank lines")
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="longest", return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
              "token_type_ids": torch.zeros_like(enc["input_ids"])}

    def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        width = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, :width] for k, v in batch.items()}

    return DistillData(inputs, None if labels is None else torch.as_tensor(labels), collate=trim)


def read_text_file(path: str | Path) -> list[str]:
    """One text per non-blank line of a UTF-8 file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such text file; give a UTF-8 file with one text per line")
    return [line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
