"""What the two prompt tasks share: the ``prompt`` config group, the template and verbalizer it builds, the
tokenizer wrapper of each model type, and the rows wrapped into prompt features.

The ``prompt`` group (``configs/prompt/*.yaml``)::

    template:   {class: manual | mixed | soft, text: '<template language>', num_tokens: 20}
    verbalizer: {class: manual | one2one | soft, classes: [...], label_words: [[...], ...], prefix: " ",
                 multi_token_handler: first, post_log_softmax: true}     (classification; null for generation)
    truncate_method: tail | head | balanced
    max_seq_length: 64           (an int; recipes set ${data.max_length})
    decoder_max_length: null     (encoder-decoders: null chooses from the targets)
    predict_eos_token: false

The module a prompt run trains is the prompt model itself (``prompt`` of :class:`PromptTaskModule`); the
delta is attached to it, so the delta's unfrozen modules also name the prompt's own trained tensors (soft
tokens, a soft verbalizer's head): checkpoints and the final delta hold them with the delta, through the
engines' ordinary delta paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.prompts.errors import PromptError
from opendelta_dist.train.models import language_model_head
from opendelta_dist.train.tasks.base import Task
from opendelta_dist.train.tuning import FULL_FINE_TUNING

PROMPT_SETTINGS = "prompt_settings.json"
"""Written beside a prompt run's final delta: the ``prompt`` group the run trained with (a run is loaded with
``opendelta_dist.train.predict.load_run``; ``save_prompt``'s ``prompt_config.json`` is the library's own format)."""

TEMPLATE_CLASSES = ("manual", "mixed", "soft")
VERBALIZER_CLASSES = ("manual", "one2one", "soft")
TRUNCATE_METHODS = ("tail", "head", "balanced")
_TEMPLATE_KEYS = ("class", "text", "num_tokens")
_VERBALIZER_KEYS = ("class", "classes", "label_words", "prefix", "multi_token_handler", "post_log_softmax")
_KEYS = ("template", "verbalizer", "truncate_method", "max_seq_length", "decoder_max_length", "predict_eos_token")


@dataclass
class PromptSettings:
    """The ``prompt`` group, checked.

    Attributes:
        template: ``class``, ``text`` and (soft templates) ``num_tokens``.
        verbalizer: ``class``, ``classes``, ``label_words`` and the verbalizer's options; None: no verbalizer.
        truncate_method: which shortenable part loses tokens first.
        max_seq_length: rows are truncated to this many tokens (padding is to the longest row of a batch).
        decoder_max_length: encoder-decoder models' decoder length; None chooses it.
        predict_eos_token: generation targets end with the end-of-sequence token.
    """

    template: dict[str, Any]
    verbalizer: dict[str, Any] | None
    truncate_method: str = "tail"
    max_seq_length: int = 128
    decoder_max_length: int | None = None
    predict_eos_token: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], needs_verbalizer: bool) -> PromptSettings:
        """Read and check the ``prompt`` group of a run configuration.

        Raises:
            DeltaConfigError: no prompt, an unknown key or class, a missing template text or label words.
        """
        group = dict(cfg.get("prompt") or {})
        unknown = sorted(set(group) - set(_KEYS))
        if unknown:
            raise DeltaConfigError(
                f"prompt has no key {', '.join(unknown)} (its keys: {', '.join(_KEYS)}); drop it with "
                + " ".join(f"~prompt.{k}" for k in unknown)
            )
        template = group.get("template")
        if not isinstance(template, Mapping) or (not template.get("text") and template.get("class") != "soft"):
            raise DeltaConfigError(
                "a prompt task needs a template: choose a prompt (prompt=sst2_it_was) or set "
                'prompt.template.text=\'{"placeholder":"text_a"} It was {"mask"}.\''
            )
        template = dict(template)
        _check_keys("prompt.template", template, _TEMPLATE_KEYS)
        _check_choice("prompt.template.class", template.get("class", "manual"), TEMPLATE_CLASSES)
        verbalizer = group.get("verbalizer")
        if needs_verbalizer:
            if not isinstance(verbalizer, Mapping) or not verbalizer.get("label_words"):
                raise DeltaConfigError(
                    "prompt classification needs a verbalizer with label words: set prompt.verbalizer.label_words "
                    "(one list of words per class, in class-id order), e.g. [[bad, terrible], [good, great]]"
                )
            verbalizer = dict(verbalizer)
            _check_keys("prompt.verbalizer", verbalizer, _VERBALIZER_KEYS)
            _check_choice("prompt.verbalizer.class", verbalizer.get("class", "manual"), VERBALIZER_CLASSES)
        else:
            verbalizer = None
        if template.get("text"):
            _check_text(str(template["text"]), template.get("class", "manual"))
        method = group.get("truncate_method", "tail")
        _check_choice("prompt.truncate_method", method, TRUNCATE_METHODS)
        length = group.get("max_seq_length")
        length = int(length) if length is not None else int((cfg.get("data") or {}).get("max_length", 128))
        decoder = group.get("decoder_max_length")
        return cls(
            template=template,
            verbalizer=verbalizer,
            truncate_method=method,
            max_seq_length=length,
            decoder_max_length=int(decoder) if decoder is not None else None,
            predict_eos_token=bool(group.get("predict_eos_token", False)),
        )

    def classes(self, label_names: list[str] | None) -> list[str]:
        """The verbalizer's classes, checked against the data's class names.

        Raises:
            DeltaConfigError: the classes and the label words differ in number, or the data names other classes.
        """
        assert self.verbalizer is not None
        words = list(self.verbalizer["label_words"])
        classes = list(self.verbalizer.get("classes") or label_names or [str(i) for i in range(len(words))])
        if len(classes) != len(words):
            raise DeltaConfigError(
                f"prompt.verbalizer has {len(classes)} classes ({', '.join(map(str, classes))}) but "
                f"{len(words)} lists of label words; give one list of words per class, in class-id order"
            )
        if label_names is not None and list(map(str, label_names)) != list(map(str, classes)):
            raise DeltaConfigError(
                f"prompt.verbalizer.classes {classes} do not match the data's classes data.label_names "
                f"{label_names}; list the same classes in the same order (class id i is the i-th)"
            )
        return [str(c) for c in classes]


def _check_text(text: str, kind: str) -> None:
    """Parse the template text now, so that a bad one (or one without a mask) stops the run before anything is
    built."""
    from opendelta_dist.prompts.template_language import parse_template

    try:
        pieces = parse_template(text)
    except PromptError as error:
        raise config_error(error) from error
    reads = {piece.get("placeholder") for piece in pieces} | {piece.get("meta") for piece in pieces}
    if "text_a" not in reads or reads - {None, "text_a"}:
        others = ", ".join(sorted(str(r) for r in reads - {None, "text_a"})) or "nothing"
        raise DeltaConfigError(
            f"prompt.template.text {text!r} reads {others} of a row, and a run's rows hold one text, the input "
            'column, as text_a: put {"placeholder":"text_a"} where the input goes (and no text_b or meta)'
        )
    if kind == "manual" and any("soft" in piece or "soft_id" in piece for piece in pieces):
        raise DeltaConfigError(
            f"prompt.template.text {text!r} has soft tokens, which a manual template does not train; set "
            "prompt.template.class=mixed"
        )
    if not any("mask" in piece for piece in pieces):
        raise DeltaConfigError(
            f'prompt.template.text {text!r} has no mask: the model predicts at {{"mask"}}; add one, e.g. '
            '\'{"placeholder":"text_a"} It was {"mask"}.\''
        )


def _check_keys(where: str, group: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(group) - set(known))
    if unknown:
        raise DeltaConfigError(
            f"{where} has no key {', '.join(unknown)} (its keys: {', '.join(known)}); drop it with "
            + " ".join(f"~{where}.{k}" for k in unknown)
        )


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DeltaConfigError(f"{key}={value!r} is not one of {', '.join(choices)}; choose one of them")


def config_error(error: PromptError) -> DeltaConfigError:
    """A prompt error met while building a run (a template, a label word) as the run's configuration error."""
    return DeltaConfigError(f"prompt: {error}")


def build_template(settings: PromptSettings, plm: nn.Module, tokenizer: Any) -> nn.Module:
    """The template the settings describe, around ``plm`` (soft tokens read its input embeddings).

    Raises:
        DeltaConfigError: the template text is invalid (the error names the position and the fix).
    """
    from opendelta_dist.prompts import ManualTemplate, MixedTemplate, SoftTemplate

    kind, text = settings.template.get("class", "manual"), settings.template.get("text")
    try:
        if kind == "manual":
            return ManualTemplate(tokenizer=tokenizer, text=text)
        if kind == "mixed":
            return MixedTemplate(model=plm, tokenizer=tokenizer, text=text)
        return SoftTemplate(
            model=plm, tokenizer=tokenizer, text=text, num_tokens=int(settings.template.get("num_tokens", 20))
        )
    except PromptError as error:
        raise config_error(error) from error


def build_verbalizer(settings: PromptSettings, classes: list[str], plm: nn.Module, tokenizer: Any) -> nn.Module:
    """The verbalizer the settings describe.

    Raises:
        DeltaConfigError: a label word tokenises to nothing or only to the unknown token, or the options are invalid.
    """
    from opendelta_dist.prompts import ManualVerbalizer, One2oneVerbalizer, SoftVerbalizer

    assert settings.verbalizer is not None
    options = dict(settings.verbalizer)
    kind = options.pop("class", "manual")
    options.pop("classes", None)
    words = [list(w) if isinstance(w, (list, tuple)) else [w] for w in options.pop("label_words")]
    try:
        if kind == "soft":
            options.pop("post_log_softmax", None)
            return SoftVerbalizer(tokenizer, plm, classes=classes, label_words=words, **options)
        if kind == "one2one":
            flat = []
            for name, group in zip(classes, words, strict=True):
                if len(group) != 1:
                    raise DeltaConfigError(
                        f"prompt.verbalizer.class=one2one takes one word per class, and class {name!r} has "
                        f"{len(group)} ({', '.join(group)}); use class=manual for several"
                    )
                flat.append(group[0])
            return One2oneVerbalizer(tokenizer, classes=classes, label_words=flat, **options)
        return ManualVerbalizer(tokenizer, classes=classes, label_words=words, **options)
    except PromptError as error:
        raise config_error(error) from error


def build_wrapper(settings: PromptSettings, plm: nn.Module, tokenizer: Any, teacher_forcing: bool = False) -> Any:
    """The tokenizer wrapper of the backbone's kind (OpenPrompt's per model type; else masked LM, causal LM or
    T5-like encoder-decoder by the model's head) with the settings' lengths and truncation.

    Raises:
        DeltaConfigError: the backbone is of a kind no wrapper handles.
    """
    from opendelta_dist.prompts.dataloader import wrapper_init_kwargs
    from opendelta_dist.prompts.plms import MODEL_CLASS_NAMES
    from opendelta_dist.prompts.seq2seq_wrappers import T5TokenizerWrapper
    from opendelta_dist.prompts.wrappers import LMTokenizerWrapper, MLMTokenizerWrapper

    config = plm.config
    if config.model_type in MODEL_CLASS_NAMES:
        cls = MODEL_CLASS_NAMES[config.model_type][3]
    else:
        by_head = {"masked_lm": MLMTokenizerWrapper, "causal_lm": LMTokenizerWrapper, "seq2seq": T5TokenizerWrapper}
        cls = by_head[language_model_head(config.model_type)]
    options: dict[str, Any] = {
        "max_seq_length": settings.max_seq_length,
        "tokenizer": tokenizer,
        "truncate_method": settings.truncate_method,
        "predict_eos_token": settings.predict_eos_token and teacher_forcing,
        "decoder_max_length": settings.decoder_max_length if settings.decoder_max_length is not None else -1,
    }
    try:
        return cls(**wrapper_init_kwargs(cls, options)[0])
    except PromptError as error:
        raise config_error(error) from error


def check_engine(engine: str) -> None:
    """Prompt tasks run on every engine whose models are transformers models (not on one with models of its own,
    such as ModelCenter's).

    Raises:
        DeltaConfigError: the engine builds its own models.
    """
    from opendelta_dist.train.engines import engine_class

    if engine_class(engine).own_models:
        raise DeltaConfigError(
            f"prompt tasks need a transformers language model, and engine={engine} builds models of its own; "
            "use engine=fsdp or engine=deepspeed (or ddp, single)"
        )


class PromptTaskModule(nn.Module):
    """The module a prompt run trains: ``prompt`` (a prompt model) and its loss. It answers what deltas ask of a
    transformers model (``config``, the input embeddings, an encoder-decoder's encoder and decoder) from the
    language model inside. A classification prompt projects only the mask positions to the vocabulary
    (``PromptForClassification.logits_at_mask_only``): training and evaluation read nothing else."""

    def __init__(self, prompt: nn.Module) -> None:
        """Wrap a prompt model."""
        super().__init__()
        self.prompt = prompt
        self.config = prompt.plm.config
        if hasattr(prompt, "logits_at_mask_only"):
            prompt.logits_at_mask_only = True

    def get_input_embeddings(self) -> nn.Module:
        """The language model's input embeddings (a soft-prompt delta puts its tokens in front of them)."""
        return self.prompt.plm.get_input_embeddings()

    def get_encoder(self) -> nn.Module:
        """An encoder-decoder language model's encoder."""
        return self.prompt.plm.get_encoder()

    def get_decoder(self) -> nn.Module:
        """An encoder-decoder language model's decoder."""
        return self.prompt.plm.get_decoder()


class PromptDataset(Dataset):
    """Rows wrapped by the template and tokenized once, up front: one feature dict per row (not padded)."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        """Keep the features.

        Raises:
            DeltaConfigError: no rows.
        """
        if not features:
            raise DeltaConfigError("no rows to wrap; load them with load_rows")
        self.features = features

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The features of row ``index``."""
        return self.features[index]


def wrap_rows(
    rows: list[dict[str, Any]],
    template: nn.Module,
    wrapper: Any,
    teacher_forcing: bool,
    text_targets: bool,
) -> PromptDataset:
    """Rows (``{"input", "target"}``) as prompt features: ``text_a`` is the input; the target is the label (class
    targets) or the text the mask must become (text targets).

    Raises:
        DeltaConfigError: a row cannot be wrapped (a row too long even after truncation, a lost prediction position).
    """
    from opendelta_dist.prompts import InputExample
    from opendelta_dist.prompts.dataloader import example_to_features

    features = []
    for index, row in enumerate(rows):
        example = InputExample(
            guid=index,
            text_a=row["input"],
            label=None if text_targets else int(row["target"]),
            tgt_text=row["target"] if text_targets else None,
        )
        try:
            feature = example_to_features(example, template, wrapper, teacher_forcing=teacher_forcing)
        except PromptError as error:
            raise config_error(error) from error
        features.append({k: v for k, v in dict(feature).items() if isinstance(v, torch.Tensor)})
    return PromptDataset(features)


def collate_features(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of prompt features padded to its longest row, as tensors only."""
    from opendelta_dist.prompts.data import collate

    batch = collate(items, pad_token_id=pad_token_id)
    return {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}


def save_prompt_settings(cfg: Mapping[str, Any], directory: Path) -> None:
    """Write the run's ``prompt`` group beside its saved delta (``prompt_settings.json``)."""
    import json

    (directory / PROMPT_SETTINGS).write_text(json.dumps(dict(cfg.get("prompt") or {}), indent=2, sort_keys=True) + "\n")


def trainable_prompt_modules(root: nn.Module, plm: nn.Module) -> list[str]:
    """The names (under ``root``) of the prompt's own modules that hold parameters the language model does not
    share: what a prompt run trains beside the delta (soft token embeddings, a soft verbalizer's head)."""
    backbone = {id(p) for p in plm.parameters()}
    names = []
    for name, module in root.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in backbone and p.requires_grad]
        if own and not name.startswith(_plm_prefix(root, plm)):
            names.append(name)
    return names


def _plm_prefix(root: nn.Module, plm: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is plm:
            return name
    raise PromptError("the language model is not part of the prompt model")


def require_model(wrapper: Any) -> None:
    """Refuse to wrap rows before the model (and with it the template) is built.

    Raises:
        DeltaConfigError: :meth:`Task.wrap_model` has not run.
    """
    if wrapper is None:
        raise DeltaConfigError("build the model (Task.wrap_model) before the data sets: the template wraps the rows")


def with_prompt_modules(options: dict[str, Any], root: nn.Module, plm: nn.Module) -> dict[str, Any]:
    """The ``delta`` group with the prompt's own trained modules added to ``unfrozen_modules`` (after the default
    ``deltas``), so that the delta trains, checkpoints and saves them."""
    extra = trainable_prompt_modules(root, plm)
    if not extra or options.get("delta_type") == FULL_FINE_TUNING:  # every parameter trains anyway
        return options
    unfrozen = list(options.get("unfrozen_modules") or ["deltas"])
    return {**options, "unfrozen_modules": unfrozen + [name for name in extra if name not in unfrozen]}


class PromptTask(Task):
    """What the prompt tasks share: the ``prompt`` group, the template that wraps the rows (built with the model,
    whose input embeddings soft tokens read), padding to the longest row, the prompt's own trained modules joining
    the delta, and ``prompt_settings.json`` beside the saved delta.

    Attributes:
        needs_verbalizer: the task reads label words (``prompt.verbalizer``).
        teacher_forcing: rows are wrapped with their target text at the mask.
    """

    needs_verbalizer: ClassVar[bool] = True
    teacher_forcing: ClassVar[bool] = False
    wraps_model = True

    def __init__(self, data: Any, model: Any, cfg: Mapping[str, Any]) -> None:
        """Read the ``prompt`` group (checked by :meth:`check_config`)."""
        super().__init__(data, model, cfg)
        self.settings = PromptSettings.from_config(cfg, needs_verbalizer=self.needs_verbalizer)
        self.template: Any = None
        self.wrapper: Any = None

    @classmethod
    def model_head(cls, model_type: str | None) -> str:
        """The model type's language-model head (masked, causal or sequence-to-sequence).

        Raises:
            DeltaConfigError: no model type, or one without a language-model head.
        """
        if model_type is None:
            raise DeltaConfigError("a prompt task needs the backbone's model_type; set model.config.model_type")
        return language_model_head(model_type)

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """The ``prompt`` group: a template (with a mask) and, where the task reads label words, a verbalizer whose
        classes match the data's."""
        settings = PromptSettings.from_config(cfg, needs_verbalizer=cls.needs_verbalizer)
        if cls.needs_verbalizer:
            settings.classes((cfg.get("data") or {}).get("label_names"))

    @classmethod
    def check_engine(cls, engine: str) -> None:
        """Every engine whose models are transformers models."""
        check_engine(engine)

    def build_prompt(self, backbone: nn.Module, tokenizer: Any) -> nn.Module:
        """Build the template and the tokenizer wrapper around ``backbone``; returns the template."""
        self.template = build_template(self.settings, backbone, tokenizer)
        self.wrapper = build_wrapper(self.settings, backbone, tokenizer, teacher_forcing=self.teacher_forcing)
        return self.template

    def dataset(self, rows: list[dict[str, Any]], tokenizer: Any) -> Dataset:
        """Rows wrapped by the template (with their target text under teacher forcing) and tokenized."""
        require_model(self.wrapper)
        text = self.targets == "text"
        return wrap_rows(rows, self.template, self.wrapper, self.teacher_forcing, text_targets=text)

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Padded to the longest row."""
        return collate_features(items, tokenizer.pad_token_id or 0)

    def save(self, module: nn.Module, directory: Path) -> None:
        """``prompt_settings.json`` (the run's ``prompt`` group) beside the delta."""
        save_prompt_settings(self.cfg, directory)

    def delta_options(self, options: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        """The delta keeps the prompt's own trained modules (soft tokens, a soft verbalizer) trainable, and saves
        them."""
        return with_prompt_modules(options, module, module.prompt.plm)
