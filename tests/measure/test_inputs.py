"""Timing inputs: real text cut to exactly the stated length, no padding."""

from __future__ import annotations

import numpy as np
import pytest

from slimkit.errors import ConfigError
from slimkit.measure.inputs import fixed_length_batch


class WordTokenizer:
    cls_token_id, sep_token_id = 101, 102

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [1000 + len(w) for w in text.split()]}


def test_rows_have_exactly_seq_len_tokens_of_real_text():
    texts = ["a bb ccc dddd", "eeeee ffffff", "g hh iii jjjj kkkkk"]
    feed = fixed_length_batch(WordTokenizer(), texts, batch_size=2, seq_len=6, max_seq_len=512)
    assert set(feed) == {"input_ids", "attention_mask", "token_type_ids"}
    ids = feed["input_ids"]
    assert ids.shape == (2, 6) and ids.dtype == np.int64
    assert ids.tolist() == [[101, 1001, 1002, 1003, 1004, 102], [101, 1005, 1006, 1001, 1002, 102]]
    assert feed["attention_mask"].tolist() == [[1] * 6] * 2
    assert not feed["token_type_ids"].any()


def test_short_text_is_repeated_to_fill_the_batch():
    feed = fixed_length_batch(WordTokenizer(), ["a bb"], batch_size=3, seq_len=5, max_seq_len=None)
    assert feed["input_ids"].tolist() == [[101, 1001, 1002, 1001, 102], [101, 1002, 1001, 1002, 102], [101, 1001, 1002, 1001, 102]]


def test_seq_len_beyond_the_model_is_a_config_error():
    with pytest.raises(ConfigError, match="measure.seq_len: 1024 is beyond the model's maximum of 512"):
        fixed_length_batch(WordTokenizer(), ["a"], batch_size=1, seq_len=1024, max_seq_len=512)
