"""Verbalizers: from the language model's output at the mask to class scores (OpenPrompt 1.0.1's API).

A verbalizer maps each class to *label words* (``positive`` -> ``["good", "great"]``). The words are
tokenised once, when they are set, and every sub-token of a word is scored at the **same** mask
position. :class:`ManualVerbalizer` computes, from the mask logits ``z`` (``[batch, vocab]``)::

    s[c, w]  = handle(z[ids(c, w)])              first / mean / max over the word's sub-tokens
    s[c, w] -= 10000 * (1 - word_mask[c, w])     slots of classes that have fewer words
    p        = softmax over all C x W words      (when post_log_softmax, the default)
    p        = renormalised p / (p_cal + 1e-15)  (when calibration logits were registered)
    l        = log(p + 1e-15)
    y[c]     = mean over the real words w of l[c, w]

so a class score is the mean of log-probabilities (the log of the geometric mean), exactly as
OpenPrompt 1.0.1. :class:`One2oneVerbalizer` is the same with one word per class and no mean.
:class:`~opendelta_dist.prompts.soft_verbalizer.SoftVerbalizer` (WARP) and
:class:`~opendelta_dist.prompts.generation_verbalizer.GenerationVerbalizer` live in their own modules.

Label words are given as a list (one entry per class, in class order: a word or a list of words), or as a
dict keyed by the classes (then ``classes`` fixes the order). Each word gets ``prefix`` (default ``" "``:
the word follows a space in the sentence) unless it starts with ``"<!>"``, whose rest is used verbatim.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opendelta_dist.prompts.errors import VerbalizerError

#: a word used verbatim, without the verbalizer's prefix
VERBATIM = "<!>"
MULTI_TOKEN_HANDLERS = ("first", "max", "mean")


def _class_name(classes: Sequence[Any] | None, index: int) -> str:
    return repr(classes[index]) if classes is not None and index < len(classes) else f"#{index}"


def add_prefix(label_words: Sequence[Any], prefix: str) -> list[list[str]]:
    """Label words as one list of words per class, each with ``prefix`` (unless it starts with ``"<!>"``).

    Args:
        label_words: one entry per class: a word or a list of words.
        prefix: the text put before every word (``" "`` for a word that follows a space).

    Returns:
        The words per class, ready to tokenise.
    """
    groups = [[words] if isinstance(words, str) else list(words) for words in label_words]
    return [[w[len(VERBATIM) :] if w.startswith(VERBATIM) else prefix + w for w in group] for group in groups]


def split_label_line(line: str) -> list[str]:
    """The comma-separated words of one line of a verbalizer file, stripped; commas inside ``{...}`` do not split."""
    words, depth, start = [], 0, 0
    for i, ch in enumerate(line):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            words.append(line[start:i])
            start = i + 1
    words.append(line[start:])
    return [w.strip() for w in words]


class Verbalizer(nn.Module):
    """Base class of every verbalizer.

    Args:
        tokenizer: the tokenizer of the language model (its vocabulary gives the label words' ids).
        classes: the classes, in the order of the labels (label ``i`` is ``classes[i]``).
        num_classes: the number of classes, when ``classes`` are not named.

    Raises:
        VerbalizerError: ``classes`` and ``num_classes`` disagree.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        classes: Sequence[Any] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.classes = list(classes) if classes is not None else None
        if classes is not None and num_classes is not None and len(classes) != num_classes:
            raise VerbalizerError(
                f"classes has {len(classes)} entries but num_classes={num_classes}: pass one, or make both agree"
            )
        self.num_classes = num_classes if num_classes is not None else (len(classes) if classes is not None else None)
        self._in_on_label_words_set = False
        # mean mask logits of a support set (see calibrate()); moves with the module, not saved in its state_dict
        self.register_buffer("_calibrate_logits", None, persistent=False)

    # ------------------------------------------------------------------ label words

    @property
    def label_words(self) -> list[Any]:
        """The label words, one entry per class in class order (after the verbalizer's processing, e.g. its prefix).

        Setting them takes a list in class order or a dict keyed by the classes, and runs
        :meth:`on_label_words_set`.

        Raises:
            VerbalizerError: read before any were set.
        """
        if not hasattr(self, "_label_words"):
            raise VerbalizerError(
                f"{type(self).__name__} has no label words yet: pass label_words=... or call from_file(path)"
            )
        return self._label_words

    @label_words.setter
    def label_words(self, label_words: Sequence[Any] | Mapping[Any, Any] | None) -> None:
        if label_words is None:
            return
        self._label_words = self._match_label_words_to_label_ids(label_words)
        if not self._in_on_label_words_set:
            #: the label words as given, in class order (what a saved prompt records)
            self.raw_label_words = list(self._label_words)
            self.safe_on_label_words_set()

    def _match_label_words_to_label_ids(self, label_words: Sequence[Any] | Mapping[Any, Any]) -> list[Any]:
        """Label words as a list in class order, checked against the classes."""
        if isinstance(label_words, Mapping):
            if self.classes is None:
                raise VerbalizerError(
                    "label words given as a dict need classes=[...] to put them in label order: pass classes, "
                    "or give the label words as a list in class order"
                )
            keys, classes = list(label_words), self.classes
            if len(keys) != len(classes) or any(c not in label_words for c in classes):
                missing = [c for c in classes if c not in label_words]
                extra = [k for k in keys if k not in classes]
                raise VerbalizerError(
                    f"the keys of the label words dict are not the classes {classes}: missing {missing}, "
                    f"not classes {extra}; key the dict by exactly the classes"
                )
            words = [label_words[c] for c in classes]
        elif isinstance(label_words, (list, tuple)):
            words = list(label_words)
        else:
            raise VerbalizerError(
                f"label words must be a list (one entry per class) or a dict keyed by the classes, "
                f"not {type(label_words).__name__}"
            )
        if not words:
            raise VerbalizerError("the label words are empty: give at least one word per class")
        if self.num_classes is not None and len(words) != self.num_classes:
            raise VerbalizerError(
                f"{len(words)} groups of label words for {self.num_classes} classes: give one word or list of "
                "words per class, in class order"
            )
        for i, group in enumerate(words):
            ok = isinstance(group, str) or (
                isinstance(group, (list, tuple)) and len(group) > 0 and all(isinstance(w, str) for w in group)
            )
            if not ok:
                raise VerbalizerError(
                    f"the label words of class {_class_name(self.classes, i)} are {group!r}: give a word or a "
                    "non-empty list of words (strings)"
                )
        if self.num_classes is None:
            self.num_classes = len(words)
        return words

    def safe_on_label_words_set(self) -> None:
        """Run :meth:`on_label_words_set`, during which setting ``label_words`` does not run it again."""
        self._in_on_label_words_set = True
        try:
            self.on_label_words_set()
        finally:
            self._in_on_label_words_set = False

    def on_label_words_set(self) -> None:
        """A hook run whenever label words are set (subclasses tokenise them here)."""

    def label_word_ids(self, words_per_class: Sequence[Sequence[str]]) -> list[list[list[int]]]:
        """The token ids of every label word (without special tokens).

        Raises:
            VerbalizerError: a word tokenises to nothing, or only to the unknown token.
        """
        if self.tokenizer is None:
            raise VerbalizerError(f"{type(self).__name__} needs a tokenizer to tokenise its label words")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        all_ids = []
        for c, words in enumerate(words_per_class):
            ids_per_word = []
            for word in words:
                ids = list(self.tokenizer.encode(word, add_special_tokens=False))
                if not ids or (unk is not None and all(i == unk for i in ids)):
                    what = "to no token" if not ids else f"only to the unknown token {self.tokenizer.unk_token!r}"
                    raise VerbalizerError(
                        f"the label word {word!r} of class {_class_name(self.classes, c)} tokenises {what}: "
                        "use a word of the tokenizer's vocabulary"
                    )
                ids_per_word.append(ids)
            all_ids.append(ids_per_word)
        if getattr(self, "multi_token_handler", None) == "first":
            self._warn_first_tokens(words_per_class, all_ids)
        return all_ids

    def _warn_first_tokens(self, words_per_class: Sequence[Sequence[str]], ids: list[list[list[int]]]) -> None:
        """Under ``multi_token_handler="first"`` a word of several tokens is scored by its first token alone: say
        which, and say when two classes are scored by the same tokens (the model cannot tell them apart)."""
        for c, words in enumerate(words_per_class):
            for word, word_ids in zip(words, ids[c], strict=True):
                if len(word_ids) > 1:
                    first = self.tokenizer.convert_ids_to_tokens(word_ids[0])
                    warnings.warn(
                        f"the label word {word!r} of class {_class_name(self.classes, c)} is {len(word_ids)} tokens; "
                        f"with multi_token_handler='first' only {first!r} is scored (use 'mean' or 'max' to score all)",
                        UserWarning,
                        stacklevel=4,
                    )
        scored = [sorted({word_ids[0] for word_ids in class_ids}) for class_ids in ids]
        for a in range(len(scored)):
            for b in range(a + 1, len(scored)):
                if scored[a] == scored[b]:
                    warnings.warn(
                        f"classes {_class_name(self.classes, a)} and {_class_name(self.classes, b)} are scored by the "
                        f"same first tokens {self.tokenizer.convert_ids_to_tokens(scored[a])}: the model cannot tell "
                        "them apart; use multi_token_handler='mean' (or words that begin differently)",
                        UserWarning,
                        stacklevel=4,
                    )

    @property
    def vocab(self) -> list[str]:
        """The tokenizer's tokens, by id."""
        if not hasattr(self, "_vocab"):
            self._vocab = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.tokenizer.vocab_size

    @property
    def needs_hidden_states(self) -> bool:
        """Whether :meth:`gather_outputs` reads the language model's hidden states (then the prompt model
        asks the model for them; scoring from logits alone skips that cost)."""
        return type(self).gather_outputs is not Verbalizer.gather_outputs

    # ------------------------------------------------------------------ scoring

    def generate_parameters(self) -> None:
        """Build the verbalizer's tensors from its label words (implemented by each verbalizer)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generate_parameters")

    def register_calibrate_logits(self, logits: torch.Tensor) -> None:
        """Register calibration logits (:func:`~opendelta_dist.prompts.calibrate.calibrate`), detached.

        Args:
            logits: the mean mask logits over a support set, ``[vocab]``.
        """
        self._calibrate_logits = logits.detach()

    def process_outputs(self, outputs: torch.Tensor, batch: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Class scores from the outputs gathered at the mask (by default :meth:`process_logits`).

        Args:
            outputs: what :meth:`gather_outputs` gave, at the mask positions.
            batch: the batch (some verbalizers read it).
            kwargs: passed on to :meth:`process_logits`.
        """
        return self.process_logits(outputs, batch=batch, **kwargs)

    def _word_scores(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Label-word scores of mask logits ``[batch, vocab]``: projected, then (``post_log_softmax``) the log of
        their joint softmax over all words, calibrated when calibration logits are registered.

        Raises:
            VerbalizerError: the logits are not one mask per example.
        """
        _check_single_mask(self, logits)
        scores = self.project(logits, **kwargs)
        if getattr(self, "post_log_softmax", False):
            probs = self.normalize(scores)
            if self._calibrate_logits is not None:
                probs = self.calibrate(probs)
            scores = torch.log(probs + 1e-15)
        return scores

    def process_logits(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Class scores from the mask logits (implemented by each verbalizer)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement process_logits")

    def gather_outputs(self, outputs: Any) -> Any:
        """What the verbalizer reads of the model's output: by default the logits ``[batch, seq, vocab]``."""
        return outputs.logits

    @staticmethod
    def aggregate(label_words_logits: torch.Tensor) -> torch.Tensor:
        """Class scores from label-word scores: the mean over the words when there are several per class."""
        return label_words_logits.mean(dim=-1) if label_words_logits.dim() > 2 else label_words_logits

    def normalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities by a softmax over all label words of all classes jointly (per example)."""
        return F.softmax(logits.reshape(logits.shape[0], -1), dim=-1).reshape(logits.shape)

    def project(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Label-word scores from vocabulary logits (implemented by each verbalizer)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement project")

    def handle_multi_token(self, label_words_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One score per word from the scores of its sub-tokens (last dim), by ``multi_token_handler``.

        ``first``: the first sub-token's; ``max``: the largest real one (padding lowered by 1000);
        ``mean``: sum over real sub-tokens / (their count + 1e-15).

        Args:
            label_words_logits: ``[batch, ..., sub_tokens]``.
            mask: 1 for real sub-tokens, ``[..., sub_tokens]`` (broadcast over the batch).

        Raises:
            VerbalizerError: an unknown ``multi_token_handler``.
        """
        handler = getattr(self, "multi_token_handler", "first")
        mask = mask.unsqueeze(0).to(label_words_logits.dtype)
        if handler == "first":
            return label_words_logits.select(dim=-1, index=0)
        if handler == "max":
            return (label_words_logits - 1000 * (1 - mask)).max(dim=-1).values
        if handler == "mean":
            return (label_words_logits * mask).sum(dim=-1) / (mask.sum(dim=-1) + 1e-15)
        raise VerbalizerError(f"multi_token_handler={handler!r} is unknown: use one of {list(MULTI_TOKEN_HANDLERS)}")

    def calibrate(self, label_words_probs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Divide label-word probabilities by those of the calibration logits and renormalise over all words.

        Args:
            label_words_probs: ``[batch, classes(, words)]``.
            kwargs: passed on to :meth:`project`.

        Raises:
            VerbalizerError: the calibration logits are not one vector over the vocabulary.
        """
        cal = self._calibrate_logits
        if cal is None or cal.dim() != 1:
            raise VerbalizerError(
                f"calibration logits must be one vector over the vocabulary, got shape "
                f"{None if cal is None else tuple(cal.shape)}: calibrate with a template that has a single mask"
            )
        cal_probs = self.normalize(self.project(cal.unsqueeze(0), **kwargs))
        shape = label_words_probs.shape
        probs = (label_words_probs / (cal_probs + 1e-15)).reshape(shape[0], -1)
        return (probs / probs.sum(dim=-1, keepdim=True)).reshape(shape)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, **kwargs: Any) -> Verbalizer:
        """Build a verbalizer from a config mapping (its keys that name constructor arguments), then
        read ``file_path`` (with ``choice``) when the config gives one and no ``label_words``.

        Args:
            config: the verbalizer's options (a dict, or OpenPrompt's ``CfgNode``).
            kwargs: more constructor arguments (e.g. ``tokenizer``), winning over the config's.

        Raises:
            VerbalizerError: both ``label_words`` and ``file_path`` are given.
        """
        options = {**dict(config or {}), **kwargs}
        accepted = inspect.signature(cls.__init__).parameters
        verbalizer = cls(**{k: v for k, v in options.items() if k in accepted and k != "self"})
        file_path = options.get("file_path")
        if file_path is not None:
            if options.get("label_words") is not None:
                raise VerbalizerError("give the label words either as label_words or in file_path, not both")
            verbalizer.from_file(file_path, options.get("choice") or 0)
        return verbalizer

    def from_file(self, path: str | Path, choice: int = 0) -> Verbalizer:
        """Read the label words from a file and set them.

        ``.txt``/``.csv``: one line per class with its words separated by commas (spaces around a word are
        dropped; a comma inside ``{...}`` does not split), and a blank line between verbalizers.
        ``.json``/``.jsonl``: one JSON value, a verbalizer (a list or a dict keyed by the classes) or a
        list of dict verbalizers.

        Args:
            path: the file.
            choice: which verbalizer of the file to use.

        Returns:
            ``self``.

        Raises:
            VerbalizerError: an unknown file type, or ``choice`` beyond the file's verbalizers.
        """
        path = Path(path)
        if path.suffix in (".txt", ".csv"):
            groups: list[list[str]] = [[]]
            for line in path.read_text().splitlines():
                line = line.strip()
                if line:
                    groups[-1].append(line)
                elif groups[-1]:
                    groups.append([])
            groups = [g for g in groups if g]
            if choice >= len(groups):
                raise VerbalizerError(f"choice={choice}, but {path} holds {len(groups)} verbalizer(s)")
            label_words: Any = [split_label_line(line) for line in groups[choice]]
        elif path.suffix in (".json", ".jsonl"):
            data = json.loads(path.read_text())
            if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
                if choice >= len(data):
                    raise VerbalizerError(f"choice={choice}, but {path} holds {len(data)} verbalizer(s)")
                label_words = data[choice]
            else:
                label_words = data
        else:
            raise VerbalizerError(f"cannot read label words from {path}: use a .txt, .csv, .json or .jsonl file")
        self.label_words = label_words
        return self


def _check_handler(handler: str) -> str:
    if handler not in MULTI_TOKEN_HANDLERS:
        raise VerbalizerError(f"multi_token_handler={handler!r} is unknown: use one of {list(MULTI_TOKEN_HANDLERS)}")
    return handler


def _check_single_mask(verbalizer: Verbalizer, logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise VerbalizerError(
            f"{type(verbalizer).__name__} scores one mask per example, but got mask logits of shape "
            f'{tuple(logits.shape)}: use a template with a single {{"mask"}}'
        )


class ManualVerbalizer(Verbalizer):
    """Hand-written label words, several per class, each possibly several tokens.

    Args:
        tokenizer: the language model's tokenizer.
        classes: the classes, in label order.
        num_classes: the number of classes, when they are not named.
        label_words: per class a word or a list of words (a list in class order, or a dict keyed by the classes).
        prefix: put before every word (not before a word starting with ``"<!>"``, whose rest is used as is).
        multi_token_handler: how a word of several tokens is scored: ``"first"``, ``"mean"`` or ``"max"``.
        post_log_softmax: turn label-word logits into log-probabilities over all label words (and
            calibrate) before the per-class mean; False averages the raw logits.

    Raises:
        VerbalizerError: bad classes or label words (see :class:`Verbalizer`), a word that tokenises to
            nothing or to the unknown token, an unknown ``multi_token_handler``.
    """

    def __init__(
        self,
        tokenizer: Any,
        classes: Sequence[Any] | None = None,
        num_classes: int | None = None,
        label_words: Sequence[Any] | Mapping[Any, Any] | None = None,
        prefix: str = " ",
        multi_token_handler: str = "first",
        post_log_softmax: bool = True,
    ) -> None:
        super().__init__(tokenizer=tokenizer, classes=classes, num_classes=num_classes)
        self.prefix = prefix
        self.multi_token_handler = _check_handler(multi_token_handler)
        self.post_log_softmax = post_log_softmax
        self.label_words = label_words

    def on_label_words_set(self) -> None:
        """Prefix the words and tokenise them."""
        self.label_words = add_prefix(self.label_words, self.prefix)
        self.generate_parameters()

    def generate_parameters(self) -> None:
        """Tensors of the label words' ids, padded with id 0: ``label_words_ids`` ``[C, W, L]``,
        ``words_ids_mask`` ``[C, W, L]`` (real sub-tokens) and ``label_words_mask`` ``[C, W]`` (real words)."""
        all_ids = self.label_word_ids(self.label_words)
        n_words = max(len(group) for group in all_ids)
        n_tokens = max(len(ids) for group in all_ids for ids in group)
        ids = torch.zeros(len(all_ids), n_words, n_tokens, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for c, group in enumerate(all_ids):
            for w, word_ids in enumerate(group):
                ids[c, w, : len(word_ids)] = torch.tensor(word_ids)
                mask[c, w, : len(word_ids)] = 1
        self.register_buffer("label_words_ids", ids)
        self.register_buffer("words_ids_mask", mask)
        self.register_buffer("label_words_mask", mask.sum(dim=-1).clamp(max=1))

    def project(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Label-word scores ``[batch, C, W]`` from mask logits ``[batch, vocab]``; missing words get -10000."""
        scores = self.handle_multi_token(logits[:, self.label_words_ids], self.words_ids_mask)
        return scores - 10000 * (1 - self.label_words_mask.to(scores.dtype))

    def process_logits(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Class scores ``[batch, C]`` from mask logits ``[batch, vocab]`` (see the module docstring).

        Raises:
            VerbalizerError: the logits are not one mask per example.
        """
        return self.aggregate(self._word_scores(logits, **kwargs))

    def aggregate(self, label_words_logits: torch.Tensor) -> torch.Tensor:
        """The mean of each class's scores over its real words."""
        mask = self.label_words_mask.to(label_words_logits.dtype)
        return (label_words_logits * mask).sum(-1) / mask.sum(-1)


class One2oneVerbalizer(Verbalizer):
    """Exactly one label word per class (a word may be several tokens).

    Args:
        tokenizer: the language model's tokenizer.
        num_classes: the number of classes, when they are not named.
        classes: the classes, in label order.
        label_words: one word per class (a word or a one-word list; a list in class order or a dict keyed
            by the classes).
        prefix: put before every word (not before a word starting with ``"<!>"``).
        multi_token_handler: how a word of several tokens is scored: ``"first"``, ``"mean"`` or ``"max"``.
        post_log_softmax: return log-probabilities over the classes' words (calibrated when registered)
            instead of raw logits.

    Raises:
        VerbalizerError: a class with several words (use :class:`ManualVerbalizer`), and the errors of
            :class:`ManualVerbalizer`.
    """

    def __init__(
        self,
        tokenizer: Any,
        num_classes: int | None = None,
        classes: Sequence[Any] | None = None,
        label_words: Sequence[Any] | Mapping[Any, Any] | None = None,
        prefix: str = " ",
        multi_token_handler: str = "first",
        post_log_softmax: bool = True,
    ) -> None:
        super().__init__(tokenizer=tokenizer, classes=classes, num_classes=num_classes)
        self.prefix = prefix
        self.multi_token_handler = _check_handler(multi_token_handler)
        self.post_log_softmax = post_log_softmax
        self.label_words = label_words

    def on_label_words_set(self) -> None:
        """Check one word per class, prefix and tokenise it."""
        for c, words in enumerate(self.label_words):
            if not isinstance(words, str) and len(words) != 1:
                raise VerbalizerError(
                    f"class {_class_name(self.classes, c)} has {len(words)} label words {list(words)}, but "
                    "One2oneVerbalizer takes one per class: use ManualVerbalizer for several"
                )
        self.label_words = [group[0] for group in add_prefix(self.label_words, self.prefix)]
        self.generate_parameters()

    def generate_parameters(self) -> None:
        """``label_words_ids`` ``[C, L]`` (padded with id 0) and ``label_words_mask`` ``[C, L]``."""
        all_ids = [group[0] for group in self.label_word_ids([[w] for w in self.label_words])]
        n_tokens = max(len(ids) for ids in all_ids)
        ids = torch.zeros(len(all_ids), n_tokens, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for c, word_ids in enumerate(all_ids):
            ids[c, : len(word_ids)] = torch.tensor(word_ids)
            mask[c, : len(word_ids)] = 1
        self.register_buffer("label_words_ids", ids)
        self.register_buffer("label_words_mask", mask)

    def project(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Class-word scores ``[batch, C]`` from mask logits ``[batch, vocab]``."""
        return self.handle_multi_token(logits[:, self.label_words_ids], self.label_words_mask)

    def process_logits(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Class scores ``[batch, C]``: log-probabilities over the classes' words, or their raw logits.

        Raises:
            VerbalizerError: the logits are not one mask per example.
        """
        return self._word_scores(logits, **kwargs)
