"""Reference fixtures written by the real OpenPrompt 1.0.1, for ``tests/prompts/test_openprompt_fixtures.py``.

Run it in the side environment that ``scripts/openprompt-fixtures.sh`` creates (PyPI ``openprompt==1.0.1``,
``transformers==4.39.3``, torch CPU; pins in ``scripts/openprompt-fixtures.requirements.txt``), never in the
project's own environment::

    bash scripts/openprompt-fixtures.sh                 # all cases, into tests/fixtures/openprompt_1_0_1/
    bash scripts/openprompt-fixtures.sh --only gpt2/    # the cases whose id starts with gpt2/

In the project's environment (transformers 5), ``python scripts/openprompt_fixtures.py --check-backbones`` loads
every saved backbone with ``from_pretrained`` and checks that no key is missing or unexpected and that the logits
equal the recorded ones.

Each tiny backbone (BERT, RoBERTa, GPT-2, T5: seeded, dropout 0, tokenizers of ``tests/assets/tokenizers/``) is
saved once (``<family>/backbone/``); every case of ``CASES`` the family can express loads a fresh copy and runs
OpenPrompt: template, verbalizer, ``PromptDataLoader`` (one batch), class logits (or generation loss), one AdamW
step, logits (or loss) again, into ``<family>/<case>/{case.json,tensors.safetensors}``; ``index.json`` lists them.
Where OpenPrompt 1.0.1 raises or misbehaves, ``case.json["openprompt_bug"]`` says so. The format is described in
``tests/fixtures/openprompt_1_0_1/README.md``. The output is deterministic: running it twice gives the same files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "openprompt_1_0_1"
TOKENIZERS = ROOT / "tests" / "assets" / "tokenizers"
FORMAT = 1

#: the versions the fixtures are made with (the script refuses others: the fixtures say what *this* OpenPrompt did)
REQUIRED = {"openprompt": "1.0.1", "transformers": "4.39.3"}
BACKBONE_SEED = 0  # torch.manual_seed before building each backbone from its config
CASE_SEED = 1234  # torch.manual_seed before each case's template and verbalizer (OpenPrompt draws with torch's RNG)
DELTA_SEED = 4321  # torch.manual_seed before the stand-in delta of the freeze_plm cases
LR = 1e-2  # torch.optim.AdamW(lr=LR), torch's other defaults

#: family -> (transformers model class, OpenPrompt tokenizer wrapper class)
FAMILIES = {
    "bert": ("BertForMaskedLM", "MLMTokenizerWrapper"),
    "roberta": ("RobertaForMaskedLM", "MLMTokenizerWrapper"),
    "gpt2": ("GPT2LMHeadModel", "LMTokenizerWrapper"),
    "t5": ("T5ForConditionalGeneration", "T5TokenizerWrapper"),
}
#: the module (inside the plm) the stand-in delta of the freeze_plm cases is attached to, as ``<module>.adapter``
DELTA_MODULE = {
    "bert": "bert.encoder.layer.0.output.dense",
    "roberta": "roberta.encoder.layer.0.output.dense",
    "gpt2": "transformer.h.0.mlp.c_proj",
    "t5": "encoder.block.0.layer.1.DenseReluDense.wo",
}


def make_config(family: str, tokenizer: Any) -> transformers.PretrainedConfig:
    """The tiny config of a family: hidden 32, 2 layers, 4 heads, dropout 0, vocabulary = ``len(tokenizer)``."""
    v, pad = len(tokenizer), tokenizer.pad_token_id
    bert_like = dict(
        vocab_size=v,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=pad,
    )
    if family == "bert":
        return transformers.BertConfig(**bert_like)
    if family == "roberta":
        return transformers.RobertaConfig(**bert_like, type_vocab_size=1, bos_token_id=0, eos_token_id=2)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=37, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=pad,
        )  # fmt: skip
    return transformers.T5Config(
        vocab_size=v, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, pad_token_id=pad, eos_token_id=1, decoder_start_token_id=pad,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- cases

SENTIMENT = [
    {"guid": "s0", "text_a": "the movie is good.", "label": 1},
    {"guid": "s1", "text_a": "This is not a good movie, it is terrible!", "label": 0},
    {"guid": "s2", "text_a": "The story was boring but the acting was great.", "label": 1},
]
PAIRS = [  # text_b, three classes (yes / no / maybe)
    {"guid": "p0", "text_a": "the movie is good.", "text_b": "this is a good movie", "label": 0},
    {"guid": "p1", "text_a": "This is not a good movie, it is terrible!", "text_b": "the movie is great", "label": 1},
    {"guid": "p2", "text_a": "The story was boring.", "text_b": "the acting was bad", "label": 2},
]
LONG = [  # long enough to be cut at max_seq_length 14
    {"guid": "l0", "text_a": "This is not a good movie, it is terrible!", "text_b": "the story was boring", "label": 0},
    {"guid": "l1", "text_a": "the movie is good and the acting was great.", "text_b": "fun", "label": 1},
]
META = [
    {"guid": "m0", "text_a": "the movie is good.", "meta": {"topic": "sports", "review": "great fun"}, "label": 1},
    {"guid": "m1", "text_a": "it is terrible!", "meta": {"topic": "science", "review": "very boring"}, "label": 0},
]
SUPPORT = [  # calibration support set (no labels), as openprompt.utils.calibrate reads it
    {"guid": "c0", "text_a": "the movie"},
    {"guid": "c1", "text_a": "This is a movie."},
    {"guid": "c2", "text_a": ""},
]

TEXT = '{"placeholder":"text_a"} It was {"mask"}.'
TEXT_AB = '{"placeholder":"text_a"} {"placeholder":"text_b"} It was {"mask"}.'
SENTIMENT_VERB = {"classes": ["negative", "positive"], "label_words": [["bad"], ["good"]]}
MULTI_WORDS = {"classes": ["negative", "positive"], "label_words": [["bad", "terrible"], ["good", "wonderful"]]}
CALLABLES = {"rstrip_period_lower": 'lambda s: s.rstrip(".").lower()'}
CLS_LOADER = {"max_seq_length": 24, "truncate_method": "tail", "batch_size": 3}
T5_CLS = {"decoder_max_length": 3}  # OpenPrompt's own T5 tutorial value (its default -1 fails)


@dataclass
class Case:
    """One OpenPrompt run on every family it applies to."""

    why: str
    template: str = "ManualTemplate"
    text: str = TEXT
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    verbalizer: str | None = "ManualVerbalizer"
    verbalizer_kwargs: dict[str, Any] = field(default_factory=lambda: dict(SENTIMENT_VERB))
    examples: list[dict[str, Any]] = field(default_factory=lambda: SENTIMENT)
    loader: dict[str, Any] = field(default_factory=lambda: dict(CLS_LOADER))
    #: loader arguments per family, over ``loader`` (T5 classification needs decoder_max_length)
    family_loader: dict[str, dict[str, Any]] = field(default_factory=lambda: {"t5": T5_CLS})
    generation: bool = False
    freeze_plm: bool = False
    delta: bool = False
    calibrate: bool = False
    #: ``raw_embedding.requires_grad_(True)`` after building the template (undoes SoftTemplate's freezing)
    unfreeze_embeddings: bool = False
    families: tuple[str, ...] = tuple(FAMILIES)
    skip_why: str = ""
    #: what OpenPrompt 1.0.1 gets wrong here (the test checks the re-implementation does NOT do it), per family
    bug: dict[str, str] = field(default_factory=dict)


ALL = tuple(FAMILIES)
NO_GEN = "masked LMs cannot be trained by teacher forcing (OpenPrompt's MLMTokenizerWrapper raises RuntimeError)"
GEN_LOADER = {"max_seq_length": 24, "batch_size": 2, "teacher_forcing": True, "predict_eos_token": True}
GEN = dict(verbalizer="GenerationVerbalizer", loader=GEN_LOADER, family_loader={"t5": {"decoder_max_length": 8}},
           generation=True, families=("gpt2", "t5"), skip_why=NO_GEN)  # fmt: skip
NO_EOS = {"predict_eos_token": False}
GEN_WORDS = {"label_words": {0: "bad", 1: "terrible movie"}}
TRUNC = dict(text=TEXT_AB, examples=LONG)


def trunc(method: str, length: int = 14) -> dict[str, Any]:
    return {"max_seq_length": length, "truncate_method": method, "batch_size": 2}


def every(families: tuple[str, ...], text: str) -> dict[str, str]:
    return dict.fromkeys(families, text)


# fmt: off
CASES: dict[str, Case] = {
    # ---- templates
    "manual": Case("ManualTemplate with text_a, default tail truncation, ManualVerbalizer one word per class"),
    "manual_text_b": Case(
        "text_a and text_b, three classes",
        text='{"placeholder":"text_a"} Question: {"placeholder":"text_b"}? Answer: {"mask"}.',
        verbalizer_kwargs={"classes": ["yes", "no", "maybe"], "label_words": [["yes"], ["no"], ["maybe"]]},
        examples=PAIRS),
    "manual_meta": Case(
        "a meta field (not shortenable by default)",
        text='{"placeholder":"text_a"} The topic is {"meta":"topic"}. It was {"mask"}.',
        examples=META, loader={**CLS_LOADER, "batch_size": 2}),
    "manual_shortenable": Case(
        "shortenable overrides: text_a kept whole, the meta field cut instead",
        text='{"placeholder":"text_a", "shortenable": False} {"meta":"review", "shortenable": True} It was {"mask"}.',
        examples=META, loader=trunc("tail", 12),
        family_loader={"t5": {**T5_CLS, "max_seq_length": 11}, "gpt2": {"max_seq_length": 8}}),
    "manual_post_processing": Case(
        "a callable post_processing on text_a (OpenPrompt: a lambda inside the template text, eval-ed)",
        text='{"placeholder":"text_a", "post_processing": ' + CALLABLES["rstrip_period_lower"] + '} It was {"mask"}.'),
    "manual_token_type_ids": Case(
        "create_token_type_ids=True (a tokenizer-wrapper kwarg forwarded by PromptDataLoader)",
        loader={**CLS_LOADER, "create_token_type_ids": True}, families=("bert",), skip_why="only BERT has token types"),
    "mixed_soft": Case(
        'MixedTemplate with two {"soft"} tokens (no text: N(0,1) rows of soft_embedding)',
        template="MixedTemplate", text='{"placeholder":"text_a"} {"soft"} {"soft"} It was {"mask"}.',
        bug={"gpt2": "soft tokens without text are silently dropped by LMTokenizerWrapper (empty piece text): the "
                     "batch has no soft position; they must be kept as soft positions"}),
    "mixed_soft_words": Case(
        'MixedTemplate {"soft": "It was"}: soft tokens initialised from the words\' embeddings',
        template="MixedTemplate", text='{"placeholder":"text_a"} {"soft": "It was"} {"mask"}.'),
    "mixed_soft_id": Case(
        'shared soft tokens: {"soft_id": 1} reuses the embedding of the first {"soft": "It", "soft_id": 1}',
        template="MixedTemplate",
        text='{"soft": "It", "soft_id": 1} {"placeholder":"text_a"} {"soft_id": 1} was {"mask"}.',
        bug={"gpt2": "a reused soft_id has text None, LMTokenizerWrapper calls len(None): TypeError; it must work"}),
    "mixed_duplicate": Case(
        '{"soft": None, "duplicate": 3}: three new soft tokens',
        template="MixedTemplate", text='{"placeholder":"text_a"} {"soft": None, "duplicate": 3} {"mask"}.',
        bug={"gpt2": "the three soft tokens have no text and are silently dropped (see mixed_soft); keep them"}),
    "mixed_duplicate_same": Case(
        '{"soft": None, "duplicate": 3, "same": True}: one soft token repeated three times',
        template="MixedTemplate",
        text='{"placeholder":"text_a"} {"soft": None, "duplicate": 3, "same": True} {"mask"}.',
        bug=every(ALL, "MixedTemplate.prepare calls len() on the int duplicate: TypeError; it must give 3 copies "
                       "of one soft id")),
    "soft_template": Case(
        "SoftTemplate(num_tokens=3): embeddings prepended, initialised from the first 3 vocabulary rows",
        template="SoftTemplate", template_kwargs={"num_tokens": 3},
        bug=every(ALL, "SoftTemplate.__init__ calls raw_embedding.requires_grad_(False): the plm's input embeddings "
                       "(and a tied LM head) stop training although freeze_plm=False; they must stay trainable")),
    "soft_template_embeddings_trained": Case(
        "as soft_template, but raw_embedding.requires_grad_(True) after building the template (the intended "
        "behaviour: the step also trains the input embeddings)",
        template="SoftTemplate", template_kwargs={"num_tokens": 3}, unfreeze_embeddings=True),
    # ---- truncation
    "trunc_tail": Case("tail truncation: the last shortenable part is cut first, from its end",
                       **TRUNC, loader=trunc("tail")),
    "trunc_head": Case("head truncation: the first shortenable part is cut first (still from its end)",
                       **TRUNC, loader=trunc("head")),
    "trunc_balanced": Case("balanced truncation: every shortenable part cut in proportion to its length",
                           **TRUNC, loader=trunc("balanced")),
    "trunc_balanced_empty_text_b": Case(
        'balanced truncation with text_b="" (an empty part for BERT and T5; " " is one token for the BPEs)',
        text=TEXT_AB, examples=[{**row, "text_b": ""} for row in LONG], loader=trunc("balanced", 10),
        bug=every(("bert", "t5"), "balanced truncation reads parts[0] of the empty text_b part: IndexError; it "
                                  "must cut the other parts")),
    "trunc_head_empty_part": Case(
        'head truncation with text_a="" before a long text_b',
        text=TEXT_AB, examples=[{**LONG[0], "text_a": "", "text_b": LONG[0]["text_a"]}, {**LONG[1], "text_a": ""}],
        loader=trunc("head", 10),
        bug=every(("bert", "roberta", "t5"), "truncate_from_head reads shortenable_ids[i][0] of the empty text_a "
                                             "part: IndexError; it must skip empty parts")),
    "trunc_tail_cuts_predicting_token": Case(
        "text_a right before the mask, cut by tail truncation",
        text='It was {"placeholder":"text_a"} {"mask"}', examples=LONG, loader=trunc("tail", 6),
        families=("gpt2",), skip_why="only a causal LM predicts from the token before the mask",
        bug={"gpt2": "the loss position is the last token of text_a, which tail truncation deletes: loss_ids are all "
                     "0 and the forward fails; the predicting token must be kept (cut before it)"}),
    "t5_default_decoder_max_length": Case(
        "T5 with PromptDataLoader's default decoder_max_length=-1",
        family_loader={}, families=("t5",), skip_why="decoder_max_length concerns encoder-decoder models only",
        bug={"t5": "the default decoder_max_length=-1 fails every example (ValueError: Truncated seq length of "
                   "'decoder_input_ids' still greater than max length -1); it must default to a working length"}),
    # ---- verbalizers
    "one2one": Case("One2oneVerbalizer (one word per class)", verbalizer="One2oneVerbalizer",
                    verbalizer_kwargs={"classes": ["negative", "positive"], "label_words": ["bad", "good"]}),
    "manual_words_dict": Case(
        "ManualVerbalizer, several words per class given as a dict (ordered by classes), one of them multi-token",
        verbalizer_kwargs={"classes": ["negative", "positive"], "label_words": {
            "positive": ["good", "great", "wonderful"], "negative": ["bad", "terrible"]}}),
    "multi_token_first": Case("multi-token label words, handler first",
                              verbalizer_kwargs={**MULTI_WORDS, "multi_token_handler": "first"}),
    "multi_token_mean": Case("multi-token label words, handler mean",
                             verbalizer_kwargs={**MULTI_WORDS, "multi_token_handler": "mean"}),
    "multi_token_max": Case("multi-token label words, handler max",
                            verbalizer_kwargs={**MULTI_WORDS, "multi_token_handler": "max"}),
    "no_post_log_softmax": Case(
        "post_log_softmax=False: the mean of raw label-word logits",
        verbalizer_kwargs={**MULTI_WORDS, "multi_token_handler": "mean", "post_log_softmax": False}),
    "calibrate": Case(
        "contextual calibration: register_calibrate_logits(openprompt.utils.calibrate.calibrate(model, support))",
        verbalizer_kwargs={**MULTI_WORDS, "label_words": [["bad", "terrible"], ["good", "great"]]}, calibrate=True,
        bug=every(ALL, "the calibration divides the softmax output in place: loss.backward() raises RuntimeError (a "
                       "variable needed for gradient computation has been modified by an inplace operation), so a "
                       "calibrated model cannot be trained; the logits before the step are right")),
    "soft_verbalizer": Case(
        "SoftVerbalizer: a copy of the LM head whose last Linear maps to the classes, initialised from the first "
        "label word of each class (a multi-token word: the mean of its sub-token rows)",
        verbalizer="SoftVerbalizer",
        verbalizer_kwargs={"classes": ["negative", "positive"], "label_words": [["terrible", "bad"], ["good"]]}),
    "generation": Case(
        "GenerationVerbalizer + PromptForGeneration: teacher forcing, predict_eos_token, the generation loss",
        verbalizer_kwargs=GEN_WORDS, examples=[SENTIMENT[1], {**SENTIMENT[0], "label": 1}], **GEN),
    "generation_no_eos": Case(
        "as generation, predict_eos_token=False", verbalizer_kwargs=GEN_WORDS,
        examples=[SENTIMENT[1], {**SENTIMENT[0], "label": 1}], **{**GEN, "loader": {**GEN_LOADER, **NO_EOS}}),
    "generation_rule": Case(
        "GenerationVerbalizer(is_rule=True): the target text built from a meta field",
        verbalizer_kwargs={"is_rule": True, "label_words": {0: 'bad {"meta":"review"}', 1: 'good {"meta":"review"}'}},
        examples=META, **GEN),
    # ---- freezing
    "freeze_plm_delta": Case(
        "freeze_plm=True with a delta module inside the plm (a stand-in for an OpenDelta delta) and soft tokens",
        template="MixedTemplate", text='{"placeholder":"text_a"} {"soft": "It was"} {"mask"}.',
        freeze_plm=True, delta=True,
        bug=every(ALL, "freeze_plm=True sets requires_grad=False on every plm parameter, the delta's too (OpenDelta "
                       "attaches deltas inside the plm): only the soft tokens train; the delta must stay trainable")),
}
# fmt: on


# ----------------------------------------------------------------------------------------------- running


class TinyAdapter(nn.Module):
    """The stand-in delta: ``out + up(relu(down(out)))`` on the output of the module it is attached to."""

    def __init__(self, dim: int, bottleneck: int = 4) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` plus the bottleneck's output."""
        return x + self.up(torch.relu(self.down(x)))


def attach_delta(plm: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """Attach a seeded ``TinyAdapter`` as ``<DELTA_MODULE>.adapter`` with a forward hook; return its weights."""
    target = plm.get_submodule(DELTA_MODULE[family])
    torch.manual_seed(DELTA_SEED)
    target.adapter = TinyAdapter(32)
    target.register_forward_hook(lambda module, args, out: module.adapter(out))
    return {f"delta.{n}": p.detach().clone() for n, p in target.adapter.named_parameters()}


class T5TokenizerFastSlowMask(transformers.T5TokenizerFast):
    """T5's fast tokenizer answering ``get_special_tokens_mask(ids)`` as the slow ``T5Tokenizer`` does.

    OpenPrompt's wrappers need that call, which fast tokenizers refuse; the slow T5 tokenizer needs a sentencepiece
    model that the tiny T5 tokenizer does not have. The ids are the fast tokenizer's."""

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """``[0] * len(ids) + [1]`` per sequence (the ``</s>`` T5 appends), like ``T5Tokenizer``."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        mask = [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]


def load_tokenizer(family: str, folder: Path) -> Any:
    """The tokenizer OpenPrompt gets: the slow class, as ``openprompt.plms.load_plm`` uses (T5: see above)."""
    if family == "t5":
        return T5TokenizerFastSlowMask.from_pretrained(str(folder))
    return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=False)


def example_objects(rows: list[dict[str, Any]]) -> list[Any]:
    """OpenPrompt ``InputExample`` objects from the JSON rows of a case."""
    from openprompt.data_utils import InputExample

    return [InputExample(**copy.deepcopy(r)) for r in rows]


def jsonable(value: Any) -> Any:
    """A JSON form of parsed template pieces and batch fields (callables by their CALLABLES name)."""
    if callable(value):
        return {"callable": next(iter(CALLABLES))}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def own_params(module: nn.Module, prefix: str, skip: tuple[str, ...] = ("raw_embedding.",)) -> dict[str, torch.Tensor]:
    """The state of a template or verbalizer without the plm modules it references."""
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items() if not k.startswith(skip)}


def error(stage: str, e: BaseException) -> dict[str, Any]:
    return {"stage": stage, "error_type": type(e).__name__, "error_message": str(e)[:1000]}


def build_loader(op: Any, family: str, rows: list[dict[str, Any]], template: Any, verbalizer: Any, tokenizer: Any,
                 loader: dict[str, Any]) -> Any:  # fmt: skip
    """An OpenPrompt ``PromptDataLoader`` over ``rows`` with the family's tokenizer wrapper."""
    wrapper = getattr(op.plms, FAMILIES[family][1])
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm's "tokenizing" bar
        return op.PromptDataLoader(dataset=example_objects(rows), template=template, verbalizer=verbalizer,
                                   tokenizer=tokenizer, tokenizer_wrapper_class=wrapper, **loader)  # fmt: skip


def run_case(op: Any, family: str, backbone: Path, case: Case) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run one case with OpenPrompt; return ``case.json``'s record and the tensors."""
    from openprompt import prompts
    from openprompt.utils.calibrate import calibrate

    tokenizer = load_tokenizer(family, backbone)
    plm = getattr(transformers, FAMILIES[family][0]).from_pretrained(str(backbone))
    loader = {**case.loader, **case.family_loader.get(family, {})}
    model_class = "PromptForGeneration" if case.generation else "PromptForClassification"
    record: dict[str, Any] = {
        "family": family,
        "why": case.why,
        "backbone": f"{family}/backbone",
        "examples": case.examples,
        "template": {"class": case.template, "text": case.text, "kwargs": case.template_kwargs},
        "verbalizer": {"class": case.verbalizer, "kwargs": jsonable(case.verbalizer_kwargs)},
        "dataloader": {"tokenizer_wrapper_class": FAMILIES[family][1], **loader},
        "tokenizer_class": type(tokenizer).__name__,
        "model": {"class": model_class, "freeze_plm": case.freeze_plm, "plm_eval_mode": False},
        "optimizer": {"class": "torch.optim.AdamW", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
        "seeds": {"case": CASE_SEED},
        "callables": {k: v for k, v in CALLABLES.items() if v in case.text},
        "unfreeze_embeddings_after_template": case.unfreeze_embeddings,
    }
    tensors: dict[str, torch.Tensor] = {}
    if case.delta:
        tensors.update(attach_delta(plm, family))
        record["delta"] = {"module": DELTA_MODULE[family], "attribute": "adapter", "class": "TinyAdapter",
                           "formula": "out + up(relu(down(out))), down: Linear(32, 4), up: Linear(4, 32)",
                           "seed": DELTA_SEED}  # fmt: skip
    stage = "template"
    try:
        torch.manual_seed(CASE_SEED)
        template_cls = getattr(prompts, case.template)
        model_arg = {} if case.template == "ManualTemplate" else {"model": plm}
        template = template_cls(tokenizer=tokenizer, text=case.text, **model_arg, **case.template_kwargs)
        record["template"]["parsed"] = jsonable(template.parse_text(case.text))
        if case.template == "MixedTemplate":
            record["template"]["soft_token_ids"] = template.soft_token_ids
            record["template"]["num_soft_token"] = template.num_soft_token
        if case.unfreeze_embeddings:
            template.raw_embedding.requires_grad_(True)
        tensors.update(own_params(template, "template"))
        stage = "verbalizer"
        verbalizer = None
        if case.verbalizer:
            kwargs = dict(case.verbalizer_kwargs)
            if case.verbalizer == "SoftVerbalizer":
                kwargs["model"] = plm
            verbalizer = getattr(prompts, case.verbalizer)(tokenizer=tokenizer, **kwargs)
            if case.verbalizer != "GenerationVerbalizer":
                record["verbalizer"]["label_words_with_prefix"] = verbalizer.label_words
                tensors.update(own_params(verbalizer, "verbalizer", skip=()))
        stage = "dataloader"
        data = build_loader(op, family, case.examples, template, verbalizer, tokenizer, loader)
        batch = next(iter(data))
        record["batch"] = {k: ("tensor" if isinstance(v, torch.Tensor) else jsonable(v)) for k, v in batch.items()}
        tensors.update({f"batch.{k}": v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        if case.generation:
            record["batch"]["tgt_text_filled"] = [e.tgt_text for e in data.raw_dataset]
        stage = "model"
        extra = {"tokenizer": tokenizer} if case.generation else {"verbalizer": verbalizer}
        model = getattr(op, model_class)(plm=plm, template=template, freeze_plm=case.freeze_plm, **extra)
        if case.calibrate:
            stage = "calibrate"
            support = {**loader, "batch_size": 2}
            sup = build_loader(op, family, SUPPORT, template, None, tokenizer, support)
            with contextlib.redirect_stderr(io.StringIO()):
                cal = calibrate(model, sup)
            verbalizer.register_calibrate_logits(cal)
            model.train()
            record["calibration"] = {"support_examples": SUPPORT, "support_dataloader": support}
            tensors["calibrate_logits"] = cal.clone()

        def forward(suffix: str) -> torch.Tensor:
            fresh = next(iter(data))  # template.process_batch replaces input_ids in the batch it gets
            if case.generation:
                loss = model(fresh)
            else:
                logits = model(fresh)
                loss = torch.nn.functional.cross_entropy(logits, fresh["label"])
                tensors["logits" + suffix] = logits.detach().clone()
            tensors["loss" + suffix] = loss.detach().clone()
            return loss

        stage = "forward"
        loss = forward("")
        stage = "step"
        names = dict(model.named_parameters())
        trainable = [n for n, p in names.items() if p.requires_grad]
        frozen = [n for n, p in names.items() if not p.requires_grad]
        record["parameters"] = {"trainable": trainable, "frozen": frozen}
        optimizer = torch.optim.AdamW([names[n] for n in trainable], lr=LR)
        optimizer.zero_grad()
        loss.backward()
        record["parameters"]["trainable_without_grad"] = [n for n in trainable if names[n].grad is None]
        optimizer.step()
        stage = "forward_after_step"
        with torch.no_grad():
            forward("_after")
        for part, module in (("template", template), ("verbalizer", verbalizer)):
            for n, p in module.named_parameters() if module is not None else ():
                if p.requires_grad and not n.startswith("raw_embedding."):
                    tensors[f"after.{part}.{n}"] = p.detach().clone()
        if case.delta:
            adapter = plm.get_submodule(DELTA_MODULE[family]).adapter
            tensors.update({f"after.delta.{n}": p.detach().clone() for n, p in adapter.named_parameters()})
        record["completed"] = True
    except Exception as e:  # OpenPrompt's failures are part of the reference
        record["completed"] = False
        record["error"] = error(stage, e)
    bug = case.bug.get(family)
    if bug:
        record["openprompt_bug"] = {"description": bug, **describe_bug(record, tensors)}
    elif not record["completed"]:
        raise RuntimeError(f"{family}: unexpected OpenPrompt failure {record['error']}")
    return record, tensors


def describe_bug(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How the bug showed: the exception, or the evidence of the wrong behaviour."""
    evidence: dict[str, Any] = {"kind": "behaviour", "stage": "result"}
    if not record["completed"]:
        evidence = {"kind": "exception", **record["error"]}
    if "batch.loss_ids" in tensors:
        evidence["loss_positions_per_row"] = (tensors["batch.loss_ids"] > 0).sum(-1).tolist()
    if not record["completed"]:
        return evidence
    if "batch.soft_token_ids" in tensors:
        evidence["soft_positions_per_row"] = (tensors["batch.soft_token_ids"] > 0).sum(-1).tolist()
        evidence["num_soft_token"] = record["template"].get("num_soft_token")
    frozen = [n for n in record["parameters"]["frozen"] if ".plm." in n]
    delta = [n for n in frozen if ".adapter." in n]
    evidence["frozen_delta_parameters" if delta else "frozen_plm_parameters"] = delta or frozen
    return evidence


# ----------------------------------------------------------------------------------------------- backbones


def reference_inputs(family: str, tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = tokenizer(["the movie is good.", "It was terrible!"], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if family == "t5":
        extra0 = tokenizer.convert_tokens_to_ids("<extra_id_0>")
        inputs["decoder_input_ids"] = torch.tensor([[0, extra0, 5], [0, extra0, 6]])
    return inputs


def write_backbone(family: str, folder: Path) -> dict[str, Any]:
    """Build, save and describe one tiny backbone (and copy its tokenizer next to it)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZERS / family))
    torch.manual_seed(BACKBONE_SEED)
    model = getattr(transformers, FAMILIES[family][0])(make_config(family, tokenizer)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    for f in sorted((TOKENIZERS / family).iterdir()):
        shutil.copyfile(f, folder / f.name)
    model = getattr(transformers, FAMILIES[family][0]).from_pretrained(str(folder)).eval()
    inputs = reference_inputs(family, tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({**inputs, "logits": logits.contiguous()}, str(folder / "reference.safetensors"))
    size = sum(p.numel() for p in model.parameters())
    return {"dir": f"{family}/backbone", "model_class": FAMILIES[family][0], "vocab_size": len(tokenizer),
            "tokenizer_wrapper_class": FAMILIES[family][1], "parameters": size}  # fmt: skip


def check_backbones(out: Path) -> int:
    """Load every saved backbone with the installed transformers; compare with reference.safetensors.

    Args:
        out: the fixture directory.

    Returns:
        The number of problems found (printed).
    """
    problems = 0
    for family, (cls, _) in FAMILIES.items():
        folder = out / family / "backbone"
        model, info = getattr(transformers, cls).from_pretrained(str(folder), output_loading_info=True)
        ref = load_file(str(folder / "reference.safetensors"))
        with torch.no_grad():
            logits = model.eval()(**{k: v for k, v in ref.items() if k != "logits"}).logits
        diff = float((logits - ref["logits"]).abs().max())
        keys = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        ok = not keys and diff < 1e-5 and len(tok) == model.config.vocab_size
        problems += not ok
        print(f"{family:8s} {'ok' if ok else 'PROBLEM'}: max |logits diff| {diff:.2e}, loading info {keys or 'clean'}")
    return problems


# ----------------------------------------------------------------------------------------------- main


def check_versions() -> dict[str, str]:
    """The installed versions of the packages the fixtures depend on; exit if they are not REQUIRED."""
    found = {}
    for name in [*REQUIRED, "torch", "tokenizers", "safetensors"]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    wrong = {k: found[k] for k, v in REQUIRED.items() if found[k] != v}
    if wrong:
        sys.exit(f"needs {REQUIRED}, found {wrong}: run it through bash scripts/openprompt-fixtures.sh")
    return found


def main(argv: list[str] | None = None) -> None:
    """Write the fixtures, or check the saved backbones (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture dir (emptied but README.md)")
    parser.add_argument("--only", default="", help="only the case ids starting with this (keeps the others)")
    parser.add_argument("--check-backbones", action="store_true", help="load the saved backbones; write nothing")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if args.check_backbones:
        sys.exit(1 if check_backbones(out) else 0)
    versions = check_versions()
    warnings.filterwarnings("ignore")
    import openprompt as op  # only here: the version check above explains a wrong environment first

    transformers.logging.set_verbosity_error()
    logging.getLogger().setLevel(logging.ERROR)  # OpenPrompt logs its warnings on the root logger
    torch.set_num_threads(1)  # deterministic, and polite on a shared machine
    torch.use_deterministic_algorithms(True)

    out.mkdir(parents=True, exist_ok=True)
    for old in sorted(out.iterdir()) if not args.only else ():  # all but the hand-written README.md
        if old.is_dir():
            shutil.rmtree(old)
        elif old.name != "README.md":
            old.unlink()
    index: dict[str, Any] = {
        "format": FORMAT,
        "generator": "scripts/openprompt_fixtures.py (bash scripts/openprompt-fixtures.sh)",
        "versions": versions,
        "python": platform.python_version(),
        "seeds": {"backbone": BACKBONE_SEED, "case": CASE_SEED, "delta": DELTA_SEED},
        "backbones": {},
        "cases": {},
        "skipped": {},
    }
    if args.only and (out / "index.json").exists():
        old = json.loads((out / "index.json").read_text())
        index["cases"], index["skipped"] = old["cases"], old["skipped"]

    for family in FAMILIES:
        folder = out / family / "backbone"
        if not folder.exists() or not args.only:
            folder.mkdir(parents=True, exist_ok=True)
            index["backbones"][family] = write_backbone(family, folder)
        else:
            index["backbones"][family] = json.loads((out / "index.json").read_text())["backbones"][family]
        for name, case in CASES.items():
            case_id = f"{family}/{name}"
            if not case_id.startswith(args.only):
                continue
            if family not in case.families:
                index["skipped"][case_id] = case.skip_why
                continue
            case_dir = out / family / name
            if case_dir.exists():
                shutil.rmtree(case_dir)
            case_dir.mkdir()
            record, tensors = run_case(op, family, folder, case)
            record["id"] = case_id
            (case_dir / "case.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if tensors:
                tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
                save_file(tensors, str(case_dir / "tensors.safetensors"))
            bug = record.get("openprompt_bug")
            index["cases"][case_id] = {
                "dir": f"{family}/{name}",
                "family": family,
                "template": case.template,
                "verbalizer": case.verbalizer,
                "model": record["model"]["class"],
                "completed": record["completed"],
                "openprompt_bug": bool(bug),
                "tensors": bool(tensors),
            }
            status = "ok" if not bug else f"openprompt_bug: {bug.get('error_type', 'behaviour')} at {bug['stage']}"
            print(f"{case_id:45s} {status}", flush=True)

    index["cases"] = dict(sorted(index["cases"].items()))
    index["skipped"] = dict(sorted(index["skipped"].items()))
    (out / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(index['cases'])} cases, {total / 1024:.0f} KiB in {out}")


if __name__ == "__main__":
    main()
