"""Metrics and their reduction over ranks (opendelta_dist.train.metrics)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import transformers as T
from torch import nn

from opendelta_dist.train.data import DataConfig, TokenizedDataset, collate
from opendelta_dist.train.metrics import (
    MetricAccumulator,
    accuracy,
    exact_match,
    normalise_text,
    reference_texts,
    seq2seq_predictions,
)
from tests.train.distributed import run_distributed


def tiny_t5() -> T.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T.T5Config(
        vocab_size=384,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T.T5ForConditionalGeneration(config).eval()


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [0.0, 5.0]])
    labels = torch.tensor([1, 1, 0, -100])
    assert accuracy(logits, labels) == (2, 3)
    token_logits = torch.zeros(2, 3, 4)
    token_logits[..., 2] = 1.0
    assert accuracy(token_logits, torch.tensor([[2, 2, -100], [0, 2, 2]])) == (4, 5)
    with pytest.raises(ValueError, match="do not fit"):
        accuracy(logits, labels[:3])


def test_exact_match_ignores_case_and_spacing():
    predictions = ["Positive", "  negative ", "pos itive", "good  movie", ""]
    references = ["positive", "negative", "positive", "Good movie", "x"]
    assert exact_match(predictions, references) == (3, 5)
    assert normalise_text(" A \t b\n") == "a b"
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_seq2seq_predictions_are_greedy_decodes():
    model, tokenizer = tiny_t5(), T.ByT5Tokenizer()
    items = [tokenizer(t) | {"labels": [1]} for t in ("a fine film", "dull")]
    batch = collate(items, pad_token_id=0)
    predictions = seq2seq_predictions(model, batch, tokenizer, max_new_tokens=4)

    # greedy decoding by hand, one forward per token
    decoder = torch.zeros(2, 1, dtype=torch.long)
    finished = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(4):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder
            ).logits[:, -1]
            token = logits.argmax(-1).masked_fill(finished, 0)
            finished |= token == 1
            decoder = torch.cat([decoder, token[:, None]], dim=1)
    assert predictions == tokenizer.batch_decode(decoder, skip_special_tokens=True)

    with pytest.raises(TypeError, match="unwrapped"):
        seq2seq_predictions(nn.Sequential(model), batch, tokenizer, 4)


def test_reference_texts_give_back_the_targets():
    tokenizer = T.ByT5Tokenizer()
    rows = [{"input": "x", "target": "good"}, {"input": "y", "target": "no way"}]
    batch = collate([*TokenizedDataset(rows, tokenizer, DataConfig())], pad_token_id=0)
    assert reference_texts(batch["labels"], tokenizer) == ["good", "no way"]


def test_accumulator_without_a_process_group():
    assert not dist.is_initialized()
    acc = MetricAccumulator("accuracy")
    acc.update(correct=3, total=4, loss_sum=2.0, loss_count=4)
    acc.update(correct=1, total=4, loss_sum=1.0, loss_count=2)
    assert acc.compute() == {"loss": 0.5, "accuracy": 0.5}
    acc.reset()
    assert all(math.isnan(v) for v in acc.compute().values())


def _reduce_on_rank() -> dict[str, float]:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        acc = MetricAccumulator("exact_match")
        acc.update(correct=rank + 1, total=5, loss_sum=float(rank), loss_count=1)
        return acc.compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_accumulator_sums_over_two_ranks():
    results = run_distributed(_reduce_on_rank, world_size=2)
    assert results == [{"loss": 0.5, "exact_match": 0.3}] * 2
