"""PromptDataLoader (1.0.1's signature), InputExample / InputFeatures, and per-batch padding to the longest row."""

from __future__ import annotations

import copy
import inspect
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from opendelta_dist.prompts.data import InputExample, InputFeatures, collate
from opendelta_dist.prompts.dataloader import PromptDataLoader, example_to_features, make_collate
from opendelta_dist.prompts.errors import WrappingError
from opendelta_dist.prompts.seq2seq_wrappers import T5TokenizerWrapper
from opendelta_dist.prompts.templates import ManualTemplate
from opendelta_dist.prompts.wrappers import LMTokenizerWrapper, MLMTokenizerWrapper

TOKENIZERS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
EXAMPLES = [
    InputExample(guid="s0", text_a="the movie is good.", label=1),
    InputExample(guid="s1", text_a="This is not a good movie, it is terrible!", text_b=None, label=0),
    InputExample(guid="s2", text_a="The story was boring but the acting was great.", label=1),
]
TEXT = '{"placeholder":"text_a"} It was {"mask"}.'


@pytest.fixture(scope="module")
def bert():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "bert")


def test_signature_and_defaults_are_openprompts():
    parameters = inspect.signature(PromptDataLoader.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert list(parameters)[1:] == [
        "dataset",
        "template",
        "tokenizer_wrapper",
        "tokenizer",
        "tokenizer_wrapper_class",
        "verbalizer",
        "max_seq_length",
        "batch_size",
        "shuffle",
        "teacher_forcing",
        "decoder_max_length",
        "predict_eos_token",
        "truncate_method",
        "drop_last",
        "kwargs",
    ]
    assert defaults == {
        "tokenizer_wrapper": None,
        "tokenizer": None,
        "tokenizer_wrapper_class": None,
        "verbalizer": None,
        "max_seq_length": 512,
        "batch_size": 1,
        "shuffle": False,
        "teacher_forcing": False,
        "decoder_max_length": -1,
        "predict_eos_token": False,
        "truncate_method": "tail",
        "drop_last": False,
    }


def test_batches_are_padded_to_their_longest_row(bert):
    template = ManualTemplate(bert, TEXT)
    loader = PromptDataLoader(
        EXAMPLES, template, tokenizer=bert, tokenizer_wrapper_class=MLMTokenizerWrapper, max_seq_length=14, batch_size=2
    )
    assert len(loader) == 2 and len(loader.wrapped_dataset) == 3 and len(loader.tensor_dataset) == 3
    first, second = list(loader)
    lengths = [len(row["input_ids"]) for row in loader.tensor_dataset]
    assert max(lengths) == 14  # truncated to max_seq_length
    assert first["input_ids"].shape == (2, max(lengths[:2]))  # padded only to the longest row of the batch
    assert second["input_ids"].shape == (1, lengths[2])
    short = lengths[0]
    assert first["attention_mask"][0].tolist() == [1] * short + [0] * (max(lengths[:2]) - short)
    assert first["input_ids"][0, short:].tolist() == [bert.pad_token_id] * (max(lengths[:2]) - short)
    assert first["loss_ids"][0, short:].tolist() == [0] * (max(lengths[:2]) - short)
    assert first["label"].tolist() == [1, 0] and first["guid"] == ["s0", "s1"]
    assert isinstance(first, InputFeatures)


def test_padding_does_not_change_the_model_output(bert):
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(bert), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
        )
    ).eval()
    template = ManualTemplate(bert, TEXT)
    batched = next(
        iter(
            PromptDataLoader(
                EXAMPLES, template, tokenizer=bert, tokenizer_wrapper_class=MLMTokenizerWrapper, batch_size=3
            )
        )
    )
    alone = next(
        iter(PromptDataLoader(EXAMPLES[:1], template, tokenizer=bert, tokenizer_wrapper_class=MLMTokenizerWrapper))
    )

    def at_mask(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[batch["loss_ids"] > 0]

    assert torch.allclose(at_mask(batched)[0], at_mask(alone)[0], atol=1e-5)


def test_plain_functions_serve_a_framework_dataloader(bert):
    template = ManualTemplate(bert, TEXT)
    wrapper = MLMTokenizerWrapper(max_seq_length=14, tokenizer=bert)
    rows = [example_to_features(example, template, wrapper) for example in EXAMPLES]
    assert all(row["input_ids"].dim() == 1 for row in rows)
    framework = DataLoader(rows, batch_size=2, collate_fn=make_collate(bert))
    reference = PromptDataLoader(EXAMPLES, template, tokenizer_wrapper=wrapper, batch_size=2)
    for ours, theirs in zip(framework, reference):
        assert ours.keys() == theirs.keys()
        for key in ours:
            value = ours[key]
            assert torch.equal(value, theirs[key]) if isinstance(value, torch.Tensor) else value == theirs[key]
    pickle.dumps(make_collate(bert))  # usable by DataLoader worker processes


def test_verbalizer_wrap_one_example_fills_the_target():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")

    class FillTarget:  # what GenerationVerbalizer does: tgt_text from the label
        def wrap_one_example(self, example):
            example.tgt_text = ["bad", "good"][example.label]
            return example

    template = ManualTemplate(tokenizer, TEXT)
    loader = PromptDataLoader(
        copy.deepcopy(EXAMPLES[:2]),
        template,
        tokenizer=tokenizer,
        verbalizer=FillTarget(),
        tokenizer_wrapper_class=LMTokenizerWrapper,
        teacher_forcing=True,
        predict_eos_token=True,
        batch_size=2,
    )
    batch = next(iter(loader))
    assert batch["tgt_text"] == ["good", "bad"]
    assert batch["input_ids_len"].tolist() == [len(row["input_ids"]) for row in loader.tensor_dataset]
    row = loader.tensor_dataset[0]
    assert row["input_ids"][-1].item() == tokenizer.eos_token_id and row["loss_ids"][-1].item() == 1


def test_t5_default_decoder_max_length_works(bert):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "t5")
    loader = PromptDataLoader(
        EXAMPLES,
        ManualTemplate(tokenizer, TEXT),
        tokenizer=tokenizer,
        tokenizer_wrapper_class=T5TokenizerWrapper,
        batch_size=3,
    )
    batch = next(iter(loader))  # 1.0.1: ValueError ... greater than max length -1
    assert batch["decoder_input_ids"].tolist() == [[0, 229]] * 3
    assert batch["loss_ids"].tolist() == [[0, 1]] * 3


def test_wrapper_kwargs_are_forwarded_or_reported(bert):
    template = ManualTemplate(bert, TEXT)
    loader = PromptDataLoader(
        EXAMPLES[:1], template, tokenizer=bert, tokenizer_wrapper_class=MLMTokenizerWrapper, create_token_type_ids=True
    )
    assert next(iter(loader))["token_type_ids"].shape == next(iter(loader))["input_ids"].shape
    with pytest.warns(UserWarning, match="no argument num_workers"):
        PromptDataLoader(
            EXAMPLES[:1], template, tokenizer=bert, tokenizer_wrapper_class=MLMTokenizerWrapper, num_workers=2
        )
    with pytest.raises(WrappingError, match="tokenizer_wrapper_class"):
        PromptDataLoader(EXAMPLES, template, tokenizer=bert)
    with pytest.raises(WrappingError, match="empty"):
        PromptDataLoader([], template, tokenizer=bert, tokenizer_wrapper_class=MLMTokenizerWrapper)


def test_shuffle_and_drop_last(bert):
    template = ManualTemplate(bert, TEXT)
    torch.manual_seed(3)
    loader = PromptDataLoader(
        EXAMPLES * 4,
        template,
        tokenizer=bert,
        tokenizer_wrapper_class=MLMTokenizerWrapper,
        batch_size=5,
        shuffle=True,
        drop_last=True,
    )
    batches = list(loader)
    assert len(loader) == 2 and [len(b["guid"]) for b in batches] == [5, 5]
    assert [g for b in batches for g in b["guid"]] != [e.guid for e in EXAMPLES * 4][:10]


def test_input_example():
    example = InputExample(guid=1, text_a="a", text_b=None, label=0)
    assert example.keys() == ["guid", "text_a", "label", "meta"]
    assert example.to_dict() == {"guid": 1, "text_a": "a", "text_b": None, "label": 0, "meta": {}, "tgt_text": None}
    assert json.loads(example.to_json_string())["text_a"] == "a" and example.to_json_string().endswith("\n")
    assert InputExample().text_a == "" and InputExample().meta == {}


def test_input_features_is_a_dict_over_fixed_keys():
    features = InputFeatures(input_ids=[1, 2], label=3)
    assert features.keys() == ["input_ids", "label"] and len(features) == 2
    assert features["soft_token_ids"] is None and features.soft_token_ids is None
    features["loss_ids"] = [0, 1]
    features.guid = "g"
    assert features.keys() == ["input_ids", "label", "loss_ids", "guid"]  # always in the fixed key order
    assert {**features} == {"input_ids": [1, 2], "label": 3, "loss_ids": [0, 1], "guid": "g"}
    features["label"] = None
    assert "label" not in features and features.keys() == ["input_ids", "loss_ids", "guid"]
    with pytest.raises(KeyError, match=r"no key 'alice'.*add_keys"):
        features["alice"] = 0
    with pytest.raises(KeyError, match="no key 'bob'"):
        InputFeatures(bob=1)
    features.to_tensor()
    assert isinstance(features["input_ids"], torch.Tensor) and features["guid"] == "g"
    assert features.to("cpu") is features
    restored = pickle.loads(pickle.dumps(features))
    assert isinstance(restored, InputFeatures) and torch.equal(restored["input_ids"], features["input_ids"])
    assert copy.copy(features).keys() == features.keys()
    # built from a mapping or from pairs, as dict() is (torch's DataParallel scatter rebuilds dicts that way)
    assert InputFeatures(features.items()).keys() == InputFeatures(dict(features)).keys() == features.keys()
    assert json.loads(features.to_json_string()) == {"input_ids": [1, 2], "loss_ids": [0, 1], "guid": "g"}


def test_collate_pads_ids_and_flags_and_keeps_lists():
    rows = [
        InputFeatures(
            input_ids=[5, 6, 7],
            attention_mask=[1, 1, 1],
            loss_ids=[-100, 1, -100],
            tgt_text="a",
            encoded_tgt_text=[[1, 2]],
            decoder_input_ids=[0, 9],
        ),
        InputFeatures(
            input_ids=[5],
            attention_mask=[1],
            loss_ids=[1],
            tgt_text="bc",
            encoded_tgt_text=[[3]],
            decoder_input_ids=[0],
        ),
    ]
    batch = collate(rows, pad_token_id=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 8]]
    assert batch["decoder_input_ids"].tolist() == [[0, 9], [0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_ids"].tolist() == [[-100, 1, -100], [1, 0, 0]]
    assert batch["tgt_text"] == ["a", "bc"] and batch["encoded_tgt_text"] == [[[1, 2]], [[3]]]
    assert InputFeatures.collate_fct(rows)["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
