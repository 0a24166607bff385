"""Loading a pretrained language model with its tokenizer and tokenizer-wrapper class (OpenPrompt 1.0.1's
``load_plm`` and ``get_model_class``).

The transformers classes are looked up by name when asked for, so importing this module loads no model code.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import transformers

from opendelta_dist.prompts.errors import WrappingError
from opendelta_dist.prompts.seq2seq_wrappers import BartTokenizerWrapper, T5LMTokenizerWrapper, T5TokenizerWrapper
from opendelta_dist.prompts.wrappers import LMTokenizerWrapper, MLMTokenizerWrapper, TokenizerWrapper

#: ``(config, tokenizer, model, wrapper)`` classes of one model type.
ModelClass = namedtuple("ModelClass", ("config", "tokenizer", "model", "wrapper"))

#: Model type -> transformers class names and the wrapper class.
MODEL_CLASS_NAMES: dict[str, tuple[str, str, str, type[TokenizerWrapper]]] = {
    "bert": ("BertConfig", "BertTokenizer", "BertForMaskedLM", MLMTokenizerWrapper),
    "roberta": ("RobertaConfig", "RobertaTokenizer", "RobertaForMaskedLM", MLMTokenizerWrapper),
    "albert": ("AlbertConfig", "AlbertTokenizer", "AlbertForMaskedLM", MLMTokenizerWrapper),
    "electra": ("ElectraConfig", "ElectraTokenizer", "ElectraForMaskedLM", MLMTokenizerWrapper),
    "gpt": ("OpenAIGPTConfig", "OpenAIGPTTokenizer", "OpenAIGPTLMHeadModel", LMTokenizerWrapper),
    "gpt2": ("GPT2Config", "GPT2Tokenizer", "GPT2LMHeadModel", LMTokenizerWrapper),
    "gptj": ("GPTJConfig", "AutoTokenizer", "GPTJForCausalLM", LMTokenizerWrapper),
    "opt": ("OPTConfig", "GPT2Tokenizer", "OPTForCausalLM", LMTokenizerWrapper),
    "llama": ("LlamaConfig", "AutoTokenizer", "LlamaForCausalLM", LMTokenizerWrapper),
    "t5": ("T5Config", "T5Tokenizer", "T5ForConditionalGeneration", T5TokenizerWrapper),
    "t5-lm": ("T5Config", "T5Tokenizer", "T5ForConditionalGeneration", T5LMTokenizerWrapper),
    "bart": ("BartConfig", "BartTokenizer", "BartForConditionalGeneration", BartTokenizerWrapper),
}


def get_model_class(plm_type: str) -> ModelClass:
    """The config, tokenizer, model and wrapper classes of a model type.

    Args:
        plm_type: One of the keys of :data:`MODEL_CLASS_NAMES` (``bert``, ``roberta``, ``albert``,
            ``electra``, ``gpt``, ``gpt2``, ``gptj``, ``opt``, ``llama``, ``t5``, ``t5-lm``, ``bart``).

    Returns:
        A ``ModelClass(config, tokenizer, model, wrapper)``.

    Raises:
        WrappingError: for an unknown model type.
    """
    if plm_type not in MODEL_CLASS_NAMES:
        raise WrappingError(
            f"unknown model type {plm_type!r}; choose one of {', '.join(MODEL_CLASS_NAMES)}, or load the model and "
            "tokenizer with transformers yourself and pass MLMTokenizerWrapper (masked LM), LMTokenizerWrapper "
            "(causal LM) or T5TokenizerWrapper as tokenizer_wrapper_class"
        )
    config, tokenizer, model, wrapper = MODEL_CLASS_NAMES[plm_type]
    return ModelClass(
        getattr(transformers, config), getattr(transformers, tokenizer), getattr(transformers, model), wrapper
    )


def add_special_tokens(model: Any, tokenizer: Any, specials_to_add: list[str] | None = None) -> tuple[Any, Any]:
    """Add a pad token (any entry of ``specials_to_add`` containing "pad") when the tokenizer has none, and
    resize the model's embeddings to the new vocabulary.

    Args:
        model: The model.
        tokenizer: The tokenizer.
        specials_to_add: Tokens to add, e.g. ``["<pad>"]``.

    Returns:
        ``(model, tokenizer)``.
    """
    for token in specials_to_add or []:
        if "pad" in token.lower() and tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": token})
            model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def load_plm(model_name: str, model_path: str, specials_to_add: list[str] | None = None) -> tuple[Any, Any, Any, Any]:
    """Load a model, its tokenizer, config and wrapper class from a local path or hub name.

    As in OpenPrompt: model types containing ``"gpt"`` get a ``<pad>`` token (added, embeddings resized) when
    they lack one; OPT stops adding its bos token. Other causal LMs without a pad token (Llama) use their eos
    token as the pad token, which padding only places where ``attention_mask`` is 0.

    Args:
        model_name: The model type (see :func:`get_model_class`).
        model_path: Directory or hub name for ``from_pretrained``.
        specials_to_add: Special tokens to add (only pad tokens are added).

    Returns:
        ``(model, tokenizer, model_config, wrapper_class)``.

    Raises:
        WrappingError: for an unknown model type.
    """
    model_class = get_model_class(model_name)
    model_config = model_class.config.from_pretrained(model_path)
    if "gpt" in model_name:
        specials_to_add = ["<pad>"]
    model = model_class.model.from_pretrained(model_path, config=model_config)
    tokenizer = model_class.tokenizer.from_pretrained(model_path)
    model, tokenizer = add_special_tokens(model, tokenizer, specials_to_add=specials_to_add)
    if "opt" in model_name:
        tokenizer.add_bos_token = False
        if hasattr(tokenizer, "update_post_processor"):
            tokenizer.update_post_processor()
    if model_class.wrapper is LMTokenizerWrapper and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, model_config, model_class.wrapper
