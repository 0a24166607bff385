"""transformers' T5 and ModelCenter's T5: the configuration, the weights and the module names of one in the other.

The ``bmt`` engine trains ModelCenter's T5 (BMTrain blocks) and saves deltas that load on transformers' T5, so
three translations live here, all pure functions of configs, names and tensors (no BMTrain needed):

- :func:`modelcenter_config` builds ModelCenter's ``T5Config`` from a transformers ``T5Config``;
- :func:`hf_to_modelcenter` / :func:`modelcenter_to_hf` convert a whole state dict
  (:func:`modelcenter_state_groups` reads a checkpoint directory's one layer at a time), and
  :func:`hf_to_modelcenter_name` / :func:`modelcenter_to_hf_name` a module or parameter name (a delta's
  checkpoint keys, ``encoder.block.0.layer.0.SelfAttention.q.lora.lora_A``, and its module names included).
  A name below a module with a counterpart whose next part is none of the backbone's own children (a delta's
  child, as ``encoder.block.0.layer.1.adapter.up_proj.weight`` under a feed-forward sub-layer) keeps that
  tail unchanged.

The weights are copied **unscaled** (ModelCenter's own converters divide some by 100 or 10 for fp16 and set
``scale``; in bf16 that is not needed), so a delta trained on one applies unchanged to the other. Only the LM
head differs: transformers multiplies the decoder output by ``d_model ** -0.5`` before the head when its config
says so (``scale_decoder_outputs``, or ``tie_word_embeddings`` before transformers 5); ModelCenter, untied
(``tied=False``), gets the head's weight already multiplied by it, and transformers 5's tied head (``lm_head``
sharing ``shared``'s tensor) is read from ``lm_head.weight`` as it is in the state dict.

ModelCenter's attention masks padded queries as well as padded keys (transformers masks keys only): the
encoder's outputs at padded positions differ, but nothing reads them (the cross-attention masks them as keys),
so the logits agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from opendelta_dist.errors import DeltaConfigError

_ATTN = {"q": "project_q", "k": "project_k", "v": "project_v", "o": "attention_out"}
_FFN = {"wi": "w_in.w", "wi_0": "w_in.w_0", "wi_1": "w_in.w_1", "wo": "w_out"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
_FFN_BACK = {v: k for k, v in _FFN.items()}
_END = r"(?=\.|$)"
# the backbone's own children of the modules a delta may be put into: a name below one of them is the backbone's
# (converted by the tables above, or refused); any other child is a delta's and keeps its name on both sides
_HF_SUBLAYER_OWN = {"layer_norm", "SelfAttention", "EncDecAttention", "DenseReluDense", "dropout"}
_HF_ATTENTION_OWN = {*_ATTN, "relative_attention_bias"}
_HF_FFN_OWN = {*_FFN, "dropout", "act"}
_MC_SUBLAYER_OWN = {"layernorm_before_attention", "layernorm_before_ffn", "self_attention", "ffn", "dropout"}
_MC_ATTENTION_OWN = {*_ATTN_BACK, "attention_dropout", "softmax"}
_MC_FFN_OWN = {"w_in", "w_out", "dropout"}


def _first(tail: str) -> str:
    """The first part of a dotted tail ``.a.b`` (``a``)."""
    return tail[1:].partition(".")[0]


def _scales_decoder_output(config: Any) -> bool:
    """Whether transformers' T5 multiplies the decoder output by ``d_model ** -0.5`` before its LM head."""
    return bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))


def activation(config: Any) -> str:
    """ModelCenter's ``ffn_activate_fn`` for a transformers T5 config (``gated-gelu`` is tanh GELU there).

    Raises:
        DeltaConfigError: an activation ModelCenter's T5 does not have.
    """
    act, gated = config.dense_act_fn, config.is_gated_act
    names = {("relu", False): "relu", ("relu", True): "gated_relu", ("gelu_new", True): "gated_gelu_new"}
    names |= {("gelu", True): "gated_gelu", ("gelu_new", False): "gelu_new", ("gelu", False): "gelu"}
    if (act, gated) not in names:
        raise DeltaConfigError(
            f"ModelCenter's T5 has no {'gated ' if gated else ''}{act!r} feed-forward (feed_forward_proj "
            f"{config.feed_forward_proj!r}); train this model with another engine (engine=fsdp)"
        )
    return names[(act, gated)]


def modelcenter_config(config: Any, dtype: torch.dtype) -> Any:
    """ModelCenter's ``T5Config`` equal to the transformers T5 ``config``, computing in ``dtype``.

    Args:
        config: a transformers ``T5Config``.
        dtype: the dtype ModelCenter builds its weights in (bf16 for training, fp32 for exact comparisons).

    Returns:
        A ``model_center.model.T5Config`` (needs the ``bmt`` extra).
    """
    from model_center.model import T5Config as MCT5Config

    mc = MCT5Config(
        vocab_size=config.vocab_size,
        dim_model=config.d_model,
        num_heads=config.num_heads,
        dim_head=config.d_kv,
        dim_ff=config.d_ff,
        num_encoder_layers=config.num_layers,
        num_decoder_layers=config.num_decoder_layers,
        dropout_p=config.dropout_rate,
        position_bias_num_buckets=config.relative_attention_num_buckets,
        position_bias_max_distance=config.relative_attention_max_distance,
        norm_eps=config.layer_norm_epsilon,
        ffn_activate_fn=activation(config),
        tied=False,
        scale=None,
    )
    mc.dtype = dtype  # ModelCenter's config knows only half=True/False
    return mc


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ModelCenter's ``rms_layernorm``, eager: the variance in fp32, the product in the input's dtype."""
    variance = hidden.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
    return (hidden * torch.rsqrt(variance + eps)).to(hidden.dtype) * weight


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """ModelCenter's ``gelu_new`` (GELU's tanh approximation), eager."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def use_eager_kernels() -> None:
    """Put eager functions in place of ModelCenter's TorchScript RMS norm and tanh GELU (for models built after).

    BMTrain recomputes a block's forward in backward and, in a block none of whose inputs requires a gradient
    (the first encoder block, under frozen embeddings), checks that the recomputation saves the same tensors as
    the forward did. TorchScript's profiling executor runs a function's first calls as a profile and later ones
    as an optimized plan that saves other tensors (on CUDA, a fused differentiable graph): a recomputation that
    meets the other plan fails with ``torch.utils.checkpoint.CheckpointError``. The eager functions compute the
    same values and save the same tensors at every call; the cost is one unfused norm per sub-layer.
    """
    import model_center.layer.feedforward as feedforward
    import model_center.layer.layernorm as layernorm

    layernorm.rms_layernorm = _rms_norm  # looked up at every call
    feedforward.gelu_new = _gelu_tanh  # bound by the feed-forward layers when they are built


def _layer_map(side: str, index: str, sub: str, rest: str) -> str | None:
    """``{encoder,decoder}.block.I.layer.J.REST`` (transformers) -> ModelCenter's name, or None."""
    base = f"{side}.layers.{index}"
    cross = side == "decoder" and sub == "1"
    ffn = (side == "encoder" and sub == "1") or (side == "decoder" and sub == "2")
    head, _, tail = rest.partition(".")
    tail = f".{tail}" if tail else ""
    if head == "layer_norm":
        where = (
            "ffn.layernorm_before_ffn" if ffn else f"{'cross_att' if cross else 'self_att'}.layernorm_before_attention"
        )
        return f"{base}.{where}{tail}"
    part = "ffn" if ffn else ("cross_att" if cross else "self_att")
    if head in ("SelfAttention", "EncDecAttention") and not ffn:
        if (head == "EncDecAttention") != cross:
            return None
        proj, _, after = tail[1:].partition(".")
        after = f".{after}" if after else ""
        if proj in _ATTN:
            return f"{base}.{part}.self_attention.{_ATTN[proj]}{after}"
        if not tail or proj not in _HF_ATTENTION_OWN:  # the attention itself, or a delta's child of it
            return f"{base}.{part}.self_attention{tail}"
        return None
    if head == "DenseReluDense" and ffn:
        proj, _, after = tail[1:].partition(".")
        after = f".{after}" if after else ""
        if proj in _FFN:
            return f"{base}.ffn.ffn.{_FFN[proj]}{after}"
        if not tail or proj not in _HF_FFN_OWN:  # the feed-forward network itself, or a delta's child of it
            return f"{base}.ffn.ffn{tail}"
        return None
    if head not in _HF_SUBLAYER_OWN:  # a delta's child of the sub-layer
        return f"{base}.{part}.{rest}"
    return None


def hf_to_modelcenter_name(name: str) -> str:
    """transformers' T5 module/parameter name -> ModelCenter's (``shared`` is ``input_embedding``, ...).

    Raises:
        DeltaConfigError: a name with no counterpart (``encoder.block.0``, a dropout, ...).
    """
    if name == "lm_head" or name.startswith("lm_head."):
        return "output_projection" + name[len("lm_head") :]
    if name == "shared" or name.startswith("shared."):
        return "input_embedding" + name[len("shared") :]
    bias = re.fullmatch(r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", name)
    if bias:
        return f"position_bias_{bias.group(1)[:3]}.relative_attention_bias"
    final = re.fullmatch(r"(encoder|decoder)\.final_layer_norm(\..+)?", name)
    if final:
        return f"{final.group(1)}.output_layernorm{final.group(2) or ''}"
    sublayer = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)", name)
    if sublayer:  # a whole sub-layer: norm, attention or feed-forward, residual
        side, index, sub = sublayer.groups()
        parts = {"encoder": ("self_att", "ffn"), "decoder": ("self_att", "cross_att", "ffn")}[side]
        if int(sub) < len(parts):
            return f"{side}.layers.{index}.{parts[int(sub)]}"
    layer = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)", name)
    mapped = _layer_map(*layer.groups()) if layer else None
    if mapped is None:
        raise DeltaConfigError(f"transformers' T5 name {name!r} has no counterpart in ModelCenter's T5")
    return mapped


def modelcenter_to_hf_name(name: str) -> str:
    """ModelCenter's T5 module/parameter name -> transformers' (the inverse of :func:`hf_to_modelcenter_name`).

    Raises:
        DeltaConfigError: a name with no counterpart (``encoder.layers.0``, a Block, ...).
    """
    if name == "output_projection" or name.startswith("output_projection."):
        return "lm_head" + name[len("output_projection") :]
    if name == "input_embedding" or name.startswith("input_embedding."):
        return "shared" + name[len("input_embedding") :]
    bias = re.fullmatch(r"position_bias_(enc|dec)\.relative_attention_bias", name)
    if bias:
        side = "encoder" if bias.group(1) == "enc" else "decoder"
        return f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    final = re.fullmatch(r"(encoder|decoder)\.output_layernorm(\..+)?", name)
    if final:
        return f"{final.group(1)}.final_layer_norm{final.group(2) or ''}"
    sublayer = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(self_att|cross_att|ffn)", name)
    if sublayer and not (sublayer.group(1) == "encoder" and sublayer.group(3) == "cross_att"):
        side, index, part = sublayer.groups()
        sub = {"self_att": 0, "cross_att": 1, "ffn": 1 if side == "encoder" else 2}[part]
        return f"{side}.block.{index}.layer.{sub}"
    layer = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(self_att|cross_att|ffn)\.(.+)", name)
    if layer:
        side, index, part, rest = layer.groups()
        if side == "encoder" and part == "cross_att":
            layer = None
        else:
            sub = {"self_att": "0", "cross_att": "1", "ffn": "1" if side == "encoder" else "2"}[part]
            base = f"{side}.block.{index}.layer.{sub}"
            attention = "EncDecAttention" if part == "cross_att" else "SelfAttention"
            for mc, hf in (("layernorm_before_attention", "layer_norm"), ("layernorm_before_ffn", "layer_norm")):
                if re.match(rf"{mc}{_END}", rest) and (mc == "layernorm_before_ffn") == (part == "ffn"):
                    return f"{base}.{hf}{rest[len(mc) :]}"
            if part != "ffn" and re.match(rf"self_attention{_END}", rest):
                tail = rest[len("self_attention") :]
                for mc, hf in _ATTN_BACK.items():
                    if re.match(rf"\.{re.escape(mc)}{_END}", tail):
                        return f"{base}.{attention}.{hf}{tail[len(mc) + 1 :]}"
                if not tail or _first(tail) not in _MC_ATTENTION_OWN:  # the attention, or a delta's child of it
                    return f"{base}.{attention}{tail}"
            elif part == "ffn" and re.match(rf"ffn{_END}", rest):
                tail = rest[len("ffn") :]
                for mc, hf in sorted(_FFN_BACK.items(), key=lambda kv: -len(kv[0])):
                    if re.match(rf"\.{re.escape(mc)}{_END}", tail):
                        return f"{base}.DenseReluDense.{hf}{tail[len(mc) + 1 :]}"
                if not tail or _first(tail) not in _MC_FFN_OWN:  # the network, or a delta's child of it
                    return f"{base}.DenseReluDense{tail}"
            elif _first(f".{rest}") not in _MC_SUBLAYER_OWN:  # a delta's child of the sub-layer
                return f"{base}.{rest}"
    raise DeltaConfigError(f"ModelCenter's T5 name {name!r} has no counterpart in transformers' T5")


def hf_to_modelcenter(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """transformers T5's state dict -> ModelCenter T5's (``tied=False``, unscaled; see the module docstring).

    Args:
        state_dict: ``T5ForConditionalGeneration``'s state dict (its ``lm_head.weight`` included).
        config: its transformers config.

    Returns:
        The state dict ModelCenter's T5 loads (the copies of the relative attention bias in later blocks
        are left out: transformers keeps it in block 0 only as well).

    Raises:
        DeltaConfigError: a tensor with no counterpart, or no LM head.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue  # transformers' views of ``shared``
        out[hf_to_modelcenter_name(name)] = tensor
    if "output_projection.weight" not in out:
        if "shared.weight" not in state_dict:
            raise DeltaConfigError("the T5 state dict has neither lm_head.weight nor shared.weight")
        out["output_projection.weight"] = state_dict["shared.weight"]  # a checkpoint saved with the head tied
    if _scales_decoder_output(config):
        head = out["output_projection.weight"]
        out["output_projection.weight"] = (head.float() * config.d_model**-0.5).to(head.dtype)
    return out


#: a transformers checkpoint directory's weights, in the order they are looked for
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_TIED_VIEWS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def local_checkpoint(name_or_path: str) -> Path:
    """The local directory of a transformers checkpoint: ``name_or_path`` itself (``pkg://`` resolved), or the hub
    repository's snapshot in the hub cache (fetched if missing: its configs and safetensors files, or its PyTorch
    files where it has no safetensors).
    """
    from opendelta_dist.train.models import resolve_name_or_path

    path = Path(resolve_name_or_path(name_or_path))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    for weights in ("*.safetensors*", "pytorch_model*.bin*"):
        snapshot = Path(snapshot_download(name_or_path, allow_patterns=["*.json", weights]))
        if any((snapshot / name).exists() for name in WEIGHT_FILES):
            return snapshot
    return snapshot


def checkpoint_tensors(directory: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Every tensor of a transformers checkpoint directory, by name, each read when called.

    The files are memory-mapped (safetensors, or PyTorch's zip format with ``mmap=True``): reading a tensor
    copies only that tensor, and the processes of one machine share a single copy in the page cache.

    Raises:
        DeltaConfigError: the directory holds none of :data:`WEIGHT_FILES`.
    """
    import json

    from safetensors import safe_open

    found = next((directory / name for name in WEIGHT_FILES if (directory / name).exists()), None)
    if found is None:
        raise DeltaConfigError(
            f"{directory} holds no transformers weights (looked for {', '.join(WEIGHT_FILES)}): pass the directory "
            "save_pretrained wrote, or a hub name"
        )
    if found.name.endswith(".index.json"):
        files = sorted({directory / f for f in json.loads(found.read_text())["weight_map"].values()})
    else:
        files = [found]
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            handle = safe_open(str(file), framework="pt")
            readers.update({name: partial(handle.get_tensor, name) for name in handle.keys()})  # noqa: SIM118
        else:
            tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            readers.update({name: partial(tensors.__getitem__, name) for name in tensors})
    return readers


def _group(name: str) -> str:
    layer = re.match(r"(encoder|decoder)\.layers\.\d+\.", name)
    return layer.group(0) if layer else ""


def modelcenter_state_groups(directory: Path, config: Any, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """ModelCenter T5's state read from a transformers checkpoint directory one part at a time: each layer of
    each stack, then the rest (embedding, position biases, final norms, LM head), in ``dtype``.

    What :func:`hf_to_modelcenter` makes of the whole state dict, without ever holding it: a process loading
    T5-11B holds one layer's tensors at a time (see :func:`checkpoint_tensors`).

    Raises:
        DeltaConfigError: no weights, a tensor with no counterpart, or no LM head.
    """
    readers = checkpoint_tensors(directory)
    groups: dict[str, list[tuple[str, str]]] = {}
    for name in readers:
        if name not in _TIED_VIEWS:
            converted = hf_to_modelcenter_name(name)
            groups.setdefault(_group(converted), []).append((name, converted))
    head = next((n for n in ("lm_head.weight", "shared.weight") if n in readers), None)
    if head is None:
        raise DeltaConfigError(f"the T5 checkpoint in {directory} has neither lm_head.weight nor shared.weight")
    rest = groups.pop("", [])
    for group in groups.values():
        yield {converted: readers[name]().to(dtype) for name, converted in group}
    out = {converted: readers[name]().to(dtype) for name, converted in rest if converted != "output_projection.weight"}
    weight = readers[head]().to(dtype)
    if _scales_decoder_output(config):
        weight = (weight.float() * config.d_model**-0.5).to(dtype)
    out["output_projection.weight"] = weight
    yield out


def modelcenter_to_hf(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """ModelCenter T5's state dict -> transformers T5's (the inverse of :func:`hf_to_modelcenter`)."""
    out = {modelcenter_to_hf_name(name): tensor for name, tensor in state_dict.items()}
    if _scales_decoder_output(config) and "lm_head.weight" in out:
        head = out["lm_head.weight"]
        out["lm_head.weight"] = (head.float() * config.d_model**0.5).to(head.dtype)
    return out
