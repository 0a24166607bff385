"""``SoftVerbalizer``: a trainable class head on the mask's hidden state (WARP, Hambardzumyan et al., 2021).

The head is a copy of the language model's output head (its last child module, e.g. BERT's ``cls``,
GPT-2's and T5's ``lm_head``) whose final ``Linear`` (hidden -> vocabulary) is replaced by a
``Linear(hidden, num_classes, bias=False)``. Row ``c`` of that layer starts as the mean of the output
embedding rows of the sub-tokens of class ``c``'s **first** label word, so before training the head
scores a class as the language model scores that word. Class logits are ``head(h_mask)``, where
``h_mask`` is the last hidden state at the mask (the decoder's for encoder-decoder models), with no
softmax. Every parameter of the head belongs to the verbalizer and is trainable.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from opendelta_dist.operations import delta_parameter_ids
from opendelta_dist.prompts.errors import VerbalizerError
from opendelta_dist.prompts.verbalizers import Verbalizer, _check_handler, add_prefix

#: how deep the final Linear of the output head is searched for (BERT's is 2 levels down)
_MAX_DEPTH = 5


def _final_linear(head: nn.Module) -> tuple[list[str], nn.Linear]:
    """The path to the output head's final ``Linear``, following the last child at each level."""
    path: list[str] = []
    module = head
    for _ in range(_MAX_DEPTH):
        if isinstance(module, nn.Linear):
            return path, module
        children = list(module.named_children())
        if not children:
            break
        name, module = children[-1]
        path.append(name)
    if isinstance(module, nn.Linear):
        return path, module
    raise VerbalizerError(
        f"no Linear layer found as the last module of the language model's output head ({type(head).__name__}) "
        f"within {_MAX_DEPTH} levels: SoftVerbalizer needs a model whose last child ends with its vocabulary projection"
    )


class SoftVerbalizer(Verbalizer):
    """A trainable class head on the mask's hidden state, initialised from the label words (WARP).

    Args:
        tokenizer: the language model's tokenizer.
        model: the language model whose output head is copied.
        classes: the classes, in label order.
        num_classes: the number of classes, when they are not named (else taken from the label words).
        label_words: per class a word or a list of words; the first word's sub-tokens initialise the head.
        prefix: put before every word (not before a word starting with ``"<!>"``).
        multi_token_handler: kept for OpenPrompt compatibility (a word's sub-tokens are averaged).

    Raises:
        VerbalizerError: no class count (neither classes, num_classes nor label words), the output head
            holds delta parameters (build the verbalizer before attaching deltas there), bad label words.
    """

    def __init__(
        self,
        tokenizer: Any,
        model: nn.Module,
        classes: Sequence[Any] | None = None,
        num_classes: int | None = None,
        label_words: Sequence[Any] | Mapping[Any, Any] | None = None,
        prefix: str = " ",
        multi_token_handler: str = "first",
    ) -> None:
        super().__init__(tokenizer=tokenizer, classes=classes, num_classes=num_classes)
        self.prefix = prefix
        self.multi_token_handler = _check_handler(multi_token_handler)
        if self.num_classes is None and label_words is not None:
            self.num_classes = len(label_words)
        if self.num_classes is None:
            raise VerbalizerError(
                "SoftVerbalizer needs the number of classes: pass classes, num_classes or label_words"
            )
        head_name, lm_head = list(model.named_children())[-1]
        if delta_parameter_ids(lm_head):
            raise VerbalizerError(
                f"the output head {head_name!r} of the model carries delta parameters, which a SoftVerbalizer "
                "would copy: build the SoftVerbalizer before attaching the delta, or exclude the head from it"
            )
        path, original = _final_linear(lm_head)
        # the vocabulary projection whose rows initialise the class rows (not registered: it stays the model's)
        self.__dict__["_vocab_projection"] = original
        self.hidden_dims = original.in_features
        new_layer = nn.Linear(self.hidden_dims, self.num_classes, bias=False)
        new_layer.to(device=original.weight.device, dtype=original.weight.dtype)
        # copy the head with the new layer in place of the vocabulary projection (never copying that one)
        memo: dict[int, Any] = {id(original): new_layer}
        self.head = copy.deepcopy(lm_head, memo=memo) if path else new_layer
        self.head.requires_grad_(True)
        # a tensor the vocabulary projection shared with its head (BERT's ``predictions.bias``) is copied, but
        # nothing reads it once the projection is replaced: frozen, so that no trainable tensor goes without a
        # gradient (DDP refuses that), and kept, so that OpenPrompt's state dicts still fit
        for shared in (original.weight, original.bias):
            orphan = memo.get(id(shared)) if shared is not None else None
            if isinstance(orphan, nn.Parameter):
                orphan.requires_grad_(False)
        self.head_last_layer_full_name = ".".join(path)
        self.label_words = label_words

    @property
    def head_last_layer(self) -> nn.Linear:
        """The head's class layer (``Linear(hidden, num_classes, bias=False)``)."""
        return self.head.get_submodule(self.head_last_layer_full_name) if self.head_last_layer_full_name else self.head

    @property
    def group_parameters_1(self) -> list[nn.Parameter]:
        """The head's parameters other than its class layer (the copied transform, if any)."""
        last = {id(p) for p in self.head_last_layer.parameters()}
        return [p for p in self.head.parameters() if id(p) not in last]

    @property
    def group_parameters_2(self) -> list[nn.Parameter]:
        """The class layer's parameters."""
        return list(self.head_last_layer.parameters())

    def on_label_words_set(self) -> None:
        """Prefix and tokenise the words and initialise the class layer from each class's first word."""
        self.label_words = add_prefix(self.label_words, self.prefix)
        self.generate_parameters()

    def generate_parameters(self) -> None:
        """``label_words_ids``/``label_words_mask`` ``[C, L]`` of each class's first word, and the class
        layer's rows set to the mean of those sub-tokens' output embedding rows."""
        first_ids = [group[0] for group in self.label_word_ids(self.label_words)]
        n_tokens = max(len(ids) for ids in first_ids)
        ids = torch.zeros(len(first_ids), n_tokens, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for c, word_ids in enumerate(first_ids):
            ids[c, : len(word_ids)] = torch.tensor(word_ids)
            mask[c, : len(word_ids)] = 1
        weight = self._vocab_projection.weight.detach()
        self.register_buffer("label_words_ids", ids.to(weight.device))
        self.register_buffer("label_words_mask", mask.to(weight.device))
        m = self.label_words_mask.to(weight.dtype).unsqueeze(-1)
        init = (weight[self.label_words_ids] * m).sum(dim=1) / m.sum(dim=1)
        with torch.no_grad():
            self.head_last_layer.weight.copy_(init.to(self.head_last_layer.weight.dtype))

    def process_hiddens(self, hiddens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Class logits ``[batch, C]`` from the hidden states at the mask ``[batch, hidden]``."""
        return self.head(hiddens)

    def process_outputs(self, outputs: torch.Tensor, batch: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Class logits from the hidden states gathered at the mask."""
        return self.process_hiddens(outputs)

    def gather_outputs(self, outputs: Any) -> torch.Tensor:
        """The last hidden states: the decoder's for an encoder-decoder model.

        Raises:
            VerbalizerError: the model returned no hidden states.
        """
        hidden = getattr(outputs, "decoder_hidden_states", None) or getattr(outputs, "hidden_states", None)
        if not hidden:
            raise VerbalizerError(
                f"the model's output ({type(outputs).__name__}) holds no hidden states, which SoftVerbalizer "
                "reads: use a model whose forward accepts output_hidden_states=True"
            )
        return hidden[-1]
