"""``GenerationVerbalizer``: a class's label words become the target text of its examples (OpenPrompt 1.0.1's API).

For generation-style classification ("all tasks are generation"): the data loader calls
``wrap_one_example``, which sets the example's ``tgt_text`` to its class's label words; a template's
``{"mask"}`` then holds that text when teacher forcing. A class may have several label words, one per
mask of the template (``{0: ["no", '{"meta": "explanation"}'], 1: ["yes", ...]}`` fills a template with
two masks): every word is kept (OpenPrompt 1.0.1 kept only the first).

With ``is_rule=True`` each label word is written in the template language and filled per example:
``{"meta": "choice1"}`` is ``example.meta["choice1"]``, ``{"placeholder": "text_a"}`` the example's
``text_a``, plain text stays. The pieces are joined with a space, as OpenPrompt 1.0.1 joins them, and a
block that directly follows text ending in a space keeps that space too: ``'good {"meta": "review"}'``
gives ``"good  " + review`` with two spaces, as 1.0.1 does. Masks, soft tokens and special tokens have no
meaning in a target and are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from opendelta_dist.prompts.errors import TemplateError, VerbalizerError
from opendelta_dist.prompts.template_language import _block_end, fill_piece, parse_template, piece_kind
from opendelta_dist.prompts.verbalizers import Verbalizer, _class_name

_RULE_KINDS = ("placeholder", "meta", "text")


class GenerationVerbalizer(Verbalizer):
    """Label words as target texts (optionally rules filled from each example).

    Args:
        tokenizer: the language model's tokenizer.
        classes: the classes, in label order (default: the keys of a dict of label words).
        num_classes: the number of classes, when they are not named.
        is_rule: read every label word as a template-language rule filled from the example.
        label_words: per class a word or a list of words (one per mask).

    Raises:
        VerbalizerError: bad label words (see :class:`~opendelta_dist.prompts.verbalizers.Verbalizer`), or a
            rule that does not parse or holds a mask, soft or special token.
    """

    def __init__(
        self,
        tokenizer: Any,
        classes: Sequence[Any] | None = None,
        num_classes: int | None = None,
        is_rule: bool = False,
        label_words: Sequence[Any] | Mapping[Any, Any] | None = None,
    ) -> None:
        if classes is None and isinstance(label_words, Mapping):
            classes = list(label_words)
        super().__init__(tokenizer=tokenizer, classes=classes, num_classes=num_classes)
        self.prefix = ""
        self.is_rule = is_rule
        self.label_words = label_words

    def on_label_words_set(self) -> None:
        """Make each class's words a list and, with ``is_rule``, parse every word into pieces."""
        self.label_words = [[words] if isinstance(words, str) else list(words) for words in self.label_words]
        self.rules: list[list[list[dict[str, Any]]]] = []
        if self.is_rule:
            self.rules = [[self._parse_rule(word, c) for word in words] for c, words in enumerate(self.label_words)]

    def _parse_rule(self, word: str, index: int) -> list[dict[str, Any]]:
        where = f"the label word {word!r} of class {_class_name(self.classes, index)}"
        try:
            pieces = parse_template(word)
        except TemplateError as error:
            raise VerbalizerError(f"{where} is not a valid rule: {error}") from None
        for piece in pieces:
            kind = piece_kind(piece)
            if kind not in _RULE_KINDS:
                raise VerbalizerError(
                    f"{where} holds a {kind!r} piece, which a target text cannot contain: a rule takes "
                    '{"meta": ...}, {"placeholder": ...} and plain text'
                )
        return [{**piece, "add_prefix_space": prefix} for piece, prefix in zip(pieces, _rule_prefixes(word))]

    def _class_index(self, label: Any) -> int:
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(self.label_words):
            return label
        if self.classes is not None and label in self.classes:
            return self.classes.index(label)
        raise VerbalizerError(
            f"the example's label {label!r} is neither a class index below {len(self.label_words)} nor one of the "
            f"classes {self.classes}: give examples labels that the verbalizer's classes cover"
        )

    def wrap_one_example(self, example: Any) -> Any:
        """A copy of the example whose ``tgt_text`` is its class's label words (one string, or a list for several).

        Raises:
            VerbalizerError: the example's label names no class.
            TemplateError: a rule reads a meta key the example lacks.
        """
        index = self._class_index(example.label)
        if self.is_rule:
            targets = [" ".join(fill_piece(piece, example) for piece in rule) for rule in self.rules[index]]
        else:
            targets = list(self.label_words[index])
        wrapped = copy.copy(example)
        wrapped.tgt_text = targets[0] if len(targets) == 1 else targets
        return wrapped


def _rule_prefixes(text: str) -> list[str]:
    """The space each piece of a rule keeps: only a block right after text that ends in a space keeps one."""
    prefixes: list[str] = []
    i, n = 0, len(text)
    while i < n:
        prefix = " " if i > 0 and text[i - 1] == " " else ""
        while i < n and text[i] == " ":
            prefix = ""  # spaces between pieces are the joining space
            i += 1
        if i == n:
            break
        if text[i] == "{":
            i = _block_end(text, i) + 1
        else:
            brace = text.find("{", i)
            i = n if brace < 0 else brace
        prefixes.append(prefix)
    return prefixes
