"""Reading, tokenizing, collating and sharding training data (opendelta_dist.train.data)."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers as T

from opendelta_dist.errors import OpenDeltaError
from opendelta_dist.train.batching import ShardedBatchSampler, build_dataloader, check_batch
from opendelta_dist.train.data import (
    DATA_DIR,
    DataConfig,
    DataError,
    TokenizedDataset,
    build_tokenizer,
    collate,
    load_rows,
)

SST2 = Path("/work/shared/data/sst2")
needs_sst2 = pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason=f"GLUE SST-2 files not present at {SST2}")

ROWS = [
    {"text": "a fine, quiet film", "label": "pos"},
    {"text": 'he said "no" twice', "label": "neg"},
    {"text": "plain", "label": "pos"},
]


def write(path: Path, fmt: str, rows: list[dict]) -> Path:
    """Write ``rows`` in ``fmt`` with the standard library."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "tsv":  # as GLUE writes it: no quoting, a '"' is a plain character
        lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]
        path.write_text("".join(line + "\n" for line in lines))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def files_config(tmp_path: Path, fmt: str = "jsonl", rows: list[dict] = ROWS, **kw) -> DataConfig:
    train = write(tmp_path / f"train.{fmt}", fmt, rows)
    dev = write(tmp_path / f"dev.{fmt}", fmt, rows)
    kw.setdefault("input_column", "text")
    kw.setdefault("target_column", "label")
    return DataConfig(train_file=str(train), eval_file=str(dev), **kw)


# ----------------------------------------------------------------------------------------- reading


def test_embedded_set_is_the_default():
    train, dev = load_rows(DataConfig(), "train"), load_rows(DataConfig(), "eval")
    assert (len(train), len(dev)) == (96, 32)
    assert Counter(r["target"] for r in train) == {"good": 48, "bad": 48}
    assert Counter(r["target"] for r in dev) == {"good": 16, "bad": 16}
    assert not {r["input"] for r in train} & {r["input"] for r in dev}
    assert (DATA_DIR / "train.jsonl").is_file() and (DATA_DIR / "dev.jsonl").is_file()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    config = files_config(tmp_path, fmt)
    expected = [{"input": r["text"], "target": r["label"]} for r in ROWS]
    assert load_rows(config, "train") == expected
    assert load_rows(config, "eval") == expected


def test_format_option_overrides_the_extension(tmp_path):
    path = write(tmp_path / "rows.txt", "jsonl", ROWS)
    config = DataConfig(
        train_file=str(path), eval_file=str(path), format="jsonl", input_column="text", target_column="label"
    )
    assert len(load_rows(config, "train")) == 3


def test_classification_maps_label_names_and_integer_ids(tmp_path):
    config = files_config(tmp_path, task="classification", label_names=["neg", "pos"])
    assert [r["target"] for r in load_rows(config, "train")] == [1, 0, 1]
    ints = [{"text": "x", "label": 1}, {"text": "y", "label": 0}]
    config = files_config(tmp_path, "jsonl", ints, task="classification")
    assert [r["target"] for r in load_rows(config, "train")] == [1, 0]


def test_seq2seq_integer_labels_become_label_names(tmp_path):
    rows = [{"text": "x", "label": 1}, {"text": "y", "label": "0"}]
    config = files_config(tmp_path, "jsonl", rows, label_names=["negative", "positive"])
    assert [r["target"] for r in load_rows(config, "train")] == ["positive", "negative"]


def test_max_train_rows_takes_the_head_of_a_seeded_permutation(tmp_path):
    rows = [{"text": f"row {i}", "label": str(i)} for i in range(20)]
    config = files_config(tmp_path, "jsonl", rows, max_train_rows=5, max_eval_rows=4, shuffle_seed=3)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:5].tolist()
    assert [r["target"] for r in load_rows(config, "train")] == [str(i) for i in order]
    assert [r["target"] for r in load_rows(config, "eval")] == ["0", "1", "2", "3"]


@needs_sst2
def test_real_sst2_dev_tsv():
    lines = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    expected = [line.split("\t") for line in lines]
    path = str(SST2 / "dev.tsv")
    config = DataConfig(
        train_file=path, eval_file=path, input_column="sentence", target_column="label", task="classification"
    )
    rows = load_rows(config, "eval")
    assert len(rows) == 872
    assert [(r["input"], r["target"]) for r in rows] == [(s, int(label)) for s, label in expected]
    assert Counter(r["target"] for r in rows) == {0: 428, 1: 444}
    config.task, config.label_names = "seq2seq", ["negative", "positive"]
    assert Counter(r["target"] for r in load_rows(config, "eval")) == {"negative": 428, "positive": 444}


@needs_sst2
def test_real_sst2_train_subset():
    config = DataConfig(
        train_file=str(SST2 / "train.tsv"),
        eval_file=str(SST2 / "dev.tsv"),
        input_column="sentence",
        target_column="label",
        task="classification",
        max_train_rows=8000,
    )
    rows = load_rows(config, "train")
    assert len(rows) == 8000 and {r["target"] for r in rows} == {0, 1}


# ----------------------------------------------------------------------------------------- errors


def error_of(config: DataConfig, split: str = "train") -> str:
    with pytest.raises(DataError) as info:
        load_rows(config, split)
    assert isinstance(info.value, OpenDeltaError) and isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_file_names_the_key_and_path(tmp_path):
    config = files_config(tmp_path)
    config.eval_file = str(tmp_path / "nope.jsonl")
    message = error_of(config, "eval")
    assert "eval_file" in message and "nope.jsonl" in message and "does not exist" in message


def test_one_file_without_the_other_is_refused(tmp_path):
    config = files_config(tmp_path)
    config.eval_file = None
    assert "eval_file" in error_of(config, "eval")


def test_unknown_extension_and_unknown_format(tmp_path):
    path = write(tmp_path / "rows.txt", "jsonl", ROWS)
    assert "data.format=" in error_of(DataConfig(train_file=str(path), eval_file=str(path)))
    config = files_config(tmp_path, format="parquet")
    assert "parquet" in error_of(config)


def test_missing_column_lists_the_columns_present(tmp_path):
    message = error_of(files_config(tmp_path, target_column="sentiment"))
    assert "'sentiment'" in message and "text, label" in message and "line 1" in message
    tsv = files_config(tmp_path, "tsv", input_column="sentence")
    assert "text, label" in error_of(tsv)


@pytest.mark.parametrize("content", ["", "\n\n", "text,label\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / ("rows.csv" if "," in content else "rows.jsonl")
    path.write_text(content)
    assert "has no rows" in error_of(DataConfig(train_file=str(path), eval_file=str(path)))


def test_malformed_rows_report_their_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": \n')
    assert "line 2" in error_of(DataConfig(train_file=str(path), eval_file=str(path)))
    path.write_text('{"input": "a", "target": "b"}\n\n{"input": 5, "target": "b"}\n')
    assert "line 3" in error_of(DataConfig(train_file=str(path), eval_file=str(path)))
    path.write_text('{"input": "a", "target": 1}\n{"input": "a", "target": "x"}\n')
    config = DataConfig(train_file=str(path), eval_file=str(path), task="classification")
    assert "line 2" in error_of(config) and "'x'" in error_of(config)
    config.label_names = ["only"]
    assert "line 1" in error_of(config) and "out of range" in error_of(config)
    path.write_text('{"input": "a", "target": 3}\n')
    seq2seq = DataConfig(train_file=str(path), eval_file=str(path), label_names=["no", "yes"])
    assert "line 1" in error_of(seq2seq) and "no name" in error_of(seq2seq)


def test_tsv_line_with_wrong_field_count(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("sentence\tlabel\ngood one\t1\nbroken line\n")
    message = error_of(
        DataConfig(train_file=str(path), eval_file=str(path), input_column="sentence", target_column="label")
    )
    assert "line 3" in message and "1 fields" in message and "header has 2" in message


def test_json_must_be_an_array(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n')
    assert "jsonl" in error_of(DataConfig(train_file=str(path), eval_file=str(path)))
    path.write_text('{"input": "a"}')
    assert "array" in error_of(DataConfig(train_file=str(path), eval_file=str(path)))


def test_unknown_name_split_and_task():
    assert "tiny_t2t" in error_of(DataConfig(name="sst2"))
    assert "split" in error_of(DataConfig(), "test")
    assert "task" in error_of(DataConfig(task="regression"))


def test_hub_without_datasets_says_to_pass_files(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    message = error_of(DataConfig(hub_name="glue", hub_config="sst2"))
    assert "datasets" in message and "train_file" in message


def test_hub_rows_and_hub_failures(monkeypatch):
    splits = {"train": [{"sentence": "nice", "label": 1}], "validation": [{"sentence": "bad", "label": 0}]}

    def load_dataset(name, config):
        if name != "glue":
            raise ConnectionError("offline")
        return splits

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    config = DataConfig(
        hub_name="glue",
        hub_config="sst2",
        input_column="sentence",
        target_column="label",
        label_names=["negative", "positive"],
    )
    assert load_rows(config, "train") == [{"input": "nice", "target": "positive"}]
    assert load_rows(config, "eval") == [{"input": "bad", "target": "negative"}]
    config.hub_name = "nowhere"
    assert "offline" in error_of(config) and "train_file" in error_of(config)


# ----------------------------------------------------------------------------------------- tokenizing


def test_build_tokenizer(tmp_path):
    assert isinstance(build_tokenizer(None), T.ByT5Tokenizer)
    assert isinstance(build_tokenizer("byt5"), T.ByT5Tokenizer)
    T.ByT5Tokenizer().save_pretrained(tmp_path)
    assert build_tokenizer(str(tmp_path))("ab")["input_ids"] == [100, 101, 1]
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(str(tmp_path / "missing"))


def test_seq2seq_items_hold_byte_ids():
    tokenizer = T.ByT5Tokenizer()
    config = DataConfig(max_length=4)
    dataset = TokenizedDataset([{"input": "abcdef", "target": "ok"}, {"input": "a", "target": "no"}], tokenizer, config)
    # ByT5: byte b -> id b + 3, then eos (1); inputs truncated to 4 tokens with the eos kept
    assert dataset[0] == {"input_ids": [100, 101, 102, 1], "attention_mask": [1, 1, 1, 1], "labels": [114, 110, 1]}
    assert dataset[1]["labels"] == [113, 114, 1] and len(dataset) == 2
    assert dataset.rows[1]["target"] == "no"


def test_too_long_target_is_an_error():
    rows = [{"input": "x", "target": "positive"}]
    with pytest.raises(DataError, match=r"set data\.max_target_length=9"):
        TokenizedDataset(rows, T.ByT5Tokenizer(), DataConfig())
    assert TokenizedDataset(rows, T.ByT5Tokenizer(), DataConfig(max_target_length=9))[0]["labels"][-1] == 1


def test_classification_items_hold_class_ids():
    config = DataConfig(task="classification")
    dataset = TokenizedDataset([{"input": "ab", "target": 1}], T.ByT5Tokenizer(), config)
    assert dataset[0]["labels"] == 1
    with pytest.raises(DataError, match="class id"):
        TokenizedDataset([{"input": "ab", "target": "good"}], T.ByT5Tokenizer(), config)


def test_collate_pads_dynamically():
    items = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [9, 1]},
        {"input_ids": [5], "attention_mask": [1], "labels": [9, 9, 9, 1]},
    ]
    batch = collate(items, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[9, 1, -100, -100], [9, 9, 9, 1]]
    assert all(t.dtype == torch.long for t in batch.values())
    classes = collate([{"input_ids": [4], "attention_mask": [1], "labels": 2}] * 2, pad_token_id=7)
    assert classes["labels"].tolist() == [2, 2]
    with pytest.raises(DataError):
        collate([], 0)


# ----------------------------------------------------------------------------------------- batching


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    a, b = ShardedBatchSampler(40, 4, 0, 1, seed=5), ShardedBatchSampler(40, 4, 0, 1, seed=5)
    first = list(a)
    assert first == list(b) and len(first) == len(a) == 10
    assert [i for batch in first for i in batch] == epoch_order(40, 5, 0)
    assert a.epoch == 1 and list(a) != first
    plain = ShardedBatchSampler(10, 3, 0, 1, seed=5, shuffle=False)
    assert list(plain) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_two_ranks_split_each_global_batch():
    n, bs, seed = 50, 3, 2
    ranks = [ShardedBatchSampler(n, bs, r, 2, seed) for r in range(2)]
    for epoch in range(2):
        order = epoch_order(n, seed, epoch)
        batches = [list(s) for s in ranks]
        assert len(batches[0]) == len(batches[1]) == n // 6
        for i, (b0, b1) in enumerate(zip(*batches)):
            assert len(b0) == len(b1) == bs and not set(b0) & set(b1)
            assert b0 + b1 == order[i * 6 : (i + 1) * 6]


@pytest.mark.parametrize(("n", "bs", "world"), [(9, 4, 2), (13, 2, 3), (10, 2, 2), (17, 4, 3), (3, 5, 3)])
def test_without_drop_last_every_example_is_used_once(n, bs, world):
    ranks = [list(ShardedBatchSampler(n, bs, r, world, 0, shuffle=False, drop_last=False)) for r in range(world)]
    assert len({len(batches) for batches in ranks}) == 1
    assert all(batch for batches in ranks for batch in batches)
    assert all(len(batch) <= bs + 1 for batches in ranks for batch in batches)
    assert sorted(i for batches in ranks for batch in batches for i in batch) == list(range(n))


def test_epochs_advance_inside_a_while_loop():
    sampler = ShardedBatchSampler(12, 4, 0, 1, seed=0)
    seen, passes = [], 0
    while len(seen) < 7:
        passes += 1
        for batch in sampler:
            seen.append(batch)
            if len(seen) == 7:
                break
    expected = [epoch_order(12, 0, e)[i : i + 4] for e in range(3) for i in range(0, 12, 4)]
    assert seen == expected[:7] and passes == 3
    assert sampler.state_dict() == {"epoch": 2, "batches_done": 1}


@pytest.mark.parametrize("stop", [1, 3, 5, 6, 8])
def test_resume_continues_the_uninterrupted_run(stop):
    dataset = TokenizedDataset(
        [{"input": f"row {i}", "target": str(i % 3)} for i in range(20)], T.ByT5Tokenizer(), DataConfig()
    )

    def batches(loader, count):
        out = []
        while len(out) < count:
            for batch in loader:
                out.append(batch["input_ids"].tolist())
                if len(out) == count:
                    break
        return out

    make = lambda: build_dataloader(dataset, 3, 1, 2, seed=4, shuffle=True, pad_token_id=0)  # noqa: E731
    full = batches(make(), 10)
    first = make()
    head = batches(first, stop)
    state = first.batch_sampler.state_dict()
    resumed = make()
    resumed.batch_sampler.load_state_dict(state)
    assert head + batches(resumed, 10 - stop) == full


def test_load_state_dict_rejects_foreign_states():
    sampler = ShardedBatchSampler(12, 4, 0, 1, seed=0)
    for state in ({"epoch": 0}, {"epoch": 0, "batches_done": 4}, {"epoch": -1, "batches_done": 0}):
        with pytest.raises(DataError):
            sampler.load_state_dict(state)


def test_sampler_refuses_impossible_shapes():
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardedBatchSampler(7, 4, 0, 2, seed=0)
    with pytest.raises(DataError, match="rank 2"):
        ShardedBatchSampler(8, 4, 2, 2, seed=0)
    with pytest.raises(DataError, match="ranks"):
        ShardedBatchSampler(1, 4, 0, 2, seed=0, drop_last=False)


def test_build_dataloader_keeps_every_eval_example():
    dataset = TokenizedDataset(load_rows(DataConfig(), "eval"), T.ByT5Tokenizer(), DataConfig())
    train = build_dataloader(dataset, 5, 0, 1, seed=0, shuffle=True, pad_token_id=0)
    evaluation = build_dataloader(dataset, 5, 0, 1, seed=0, shuffle=False, pad_token_id=0)
    assert len(train) == 6 and sum(len(b["labels"]) for b in train) == 30
    assert len(evaluation) == 7 and sum(len(b["labels"]) for b in evaluation) == 32


def test_check_batch():
    assert check_batch(32, 4, 2) == 4
    assert check_batch(8, 1, 1) == 8
    with pytest.raises(DataError) as info:
        check_batch(10, 4, 1)
    message = str(info.value)
    assert "global batch 10 is not divisible by world size 4 x gradient accumulation 1" in message
    assert "8 or 12" in message
    with pytest.raises(DataError, match=r"e\.g\. 6"):
        check_batch(4, 3, 2)
    with pytest.raises(DataError, match="at least 1"):
        check_batch(8, 0, 1)


def test_eval_split_holds_out_training_rows_when_there_is_no_eval_file(tmp_path):
    import json

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"input": f"row {i}", "target": str(i)}) + "\n" for i in range(20)))
    config = DataConfig(train_file=str(train), eval_split=0.25)
    training, evaluation = load_rows(config, "train"), load_rows(config, "eval")
    assert len(evaluation) == 5 and len(training) == 15
    assert {r["input"] for r in training}.isdisjoint(r["input"] for r in evaluation)
    assert load_rows(config, "eval") == evaluation  # the same rows every time (shuffle_seed)
    with pytest.raises(DataError, match=r"or data.eval_split=0.05 to hold out 5% of the training rows"):
        load_rows(DataConfig(train_file=str(train)), "eval")
    with pytest.raises(DataError, match=r"data.eval_split=1.5 must be a fraction between 0 and 1"):
        load_rows(DataConfig(train_file=str(train), eval_split=1.5), "eval")
