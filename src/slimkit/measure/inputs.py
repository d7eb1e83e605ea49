"""Inputs for timing: real text that fills exactly the stated sequence length."""

from __future__ import annotations

import numpy as np

from slimkit.errors import ConfigError


def fixed_length_batch(tokenizer, texts: list[str], batch_size: int, seq_len: int, max_seq_len: int | None) -> dict[str, np.ndarray]:
    """``batch_size`` rows of real text, each exactly ``seq_len`` tokens with no padding.

    Text is concatenated and cut so that every variant computes on every position: no
    variant can gain by skipping padding.
    """
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ConfigError(
            f"measure.seq_len: {seq_len} is beyond the model's maximum of {max_seq_len}; "
            f"use a sequence length <= {max_seq_len}"
        )
    body = seq_len - 2  # [CLS] ... [SEP]
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= body * batch_size:
            break
    if len(ids) < body * batch_size:
        ids = (ids * (body * batch_size // max(len(ids), 1) + 1))
    rows = [
        [tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id]
        for i in range(batch_size)
    ]
    input_ids = np.array(rows, dtype=np.int64)
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "token_type_ids": np.zeros_like(input_ids),
    }
