"""Prompt models: a language model, a template and (for classification) a verbalizer (OpenPrompt 1.0.1's API).

``PromptModel(plm, template)`` runs a batch through ``template.process_batch``, the language model and
``template.post_processing_outputs``. Only the batch entries that the model's ``forward`` names are
passed to it (``loss_ids``, ``soft_token_ids``, ``label``, ``guid`` ... stay out), and hidden states are
requested only when the verbalizer's ``needs_hidden_states`` is true (:class:`Verbalizer` defines it: true when a
verbalizer overrides ``gather_outputs``, as :class:`~opendelta_dist.prompts.soft_verbalizer.SoftVerbalizer` does;
a verbalizer without the attribute gets them), which spares every other forward the cost of returning them.

``PromptForClassification`` gathers the verbalizer's outputs at the positions where ``loss_ids > 0``
(the mask) and turns them into class scores. ``PromptForGeneration`` computes the teacher-forced loss
(summed over each sequence, then averaged over the batch) and generates with the language model's own
``generate``: one batched call for encoder-decoder models, one call per example for decoder-only ones.

Deltas (:mod:`opendelta_dist.deltas`) attached to the language model are part of it: ``freeze_plm=True``
freezes the language model's own parameters and leaves every delta parameter as it is, so a prompt model
trains its deltas together with the template's soft tokens and the verbalizer's head.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from opendelta_dist.operations import delta_parameter_ids, pristine_named_parameters
from opendelta_dist.prompts.errors import PromptError, WrappingError
from opendelta_dist.prompts.templates import Template
from opendelta_dist.prompts.verbalizers import Verbalizer

logger = logging.getLogger("opendelta_dist")

# decoder-side inputs that generate() makes itself (from the decoder ids it is given)
_DECODER_STATE_KEYS = ("decoder_attention_mask", "decoder_inputs_embeds", "labels", "use_cache")


def _copy_batch(batch: Any) -> Any:
    """A shallow copy of a batch, so that a template's ``process_batch`` never changes the caller's batch."""
    return dict(batch) if type(batch) is dict else copy.copy(batch)


def _module_device(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def forward_argument_names(model: nn.Module) -> tuple[list[str], bool]:
    """The keyword arguments ``model.forward`` names, and whether it also takes ``**kwargs``."""
    params = inspect.signature(model.forward).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def freeze_backbone(plm: nn.Module) -> None:
    """Freeze the language model's own parameters; the parameters of deltas attached to it are left as they are."""
    keep = delta_parameter_ids(plm)
    for p in itertools.chain(plm.parameters(), (p for _, p in pristine_named_parameters(plm))):
        if id(p) not in keep:
            p.requires_grad_(False)


class PromptModel(nn.Module):
    """A language model with a template in front of it.

    Args:
        plm: the language model (any deltas already attached to it, or attached later, are part of it).
        template: the template that wraps the examples and processes each batch (soft tokens).
        freeze_plm: freeze the language model's own parameters. Delta parameters attached to it are not
            frozen (their delta's ``freeze_module`` decides about them), nor are the template's and
            the verbalizer's.
        plm_eval_mode: keep the language model (with its deltas) in eval mode: dropout stays off even when
            the prompt model is put in ``train()`` mode; implies ``freeze_plm``.
    """

    def __init__(
        self,
        plm: nn.Module,
        template: nn.Module,
        freeze_plm: bool = False,
        plm_eval_mode: bool = False,
    ) -> None:
        super().__init__()
        self.plm = plm
        self.template = template
        self.freeze_plm = freeze_plm
        self.plm_eval_mode = plm_eval_mode
        if freeze_plm or plm_eval_mode:
            freeze_backbone(plm)
        if plm_eval_mode:
            plm.eval()
        self.forward_keys, self._takes_kwargs = forward_argument_names(plm)
        self.main_input_name = self._main_input_name()

    def _main_input_name(self) -> str:
        encoder_name = getattr(getattr(self.plm, "encoder", None), "main_input_name", None)
        return encoder_name or getattr(self.plm, "main_input_name", "input_ids")

    def train(self, mode: bool = True) -> PromptModel:
        """Set train or eval mode; with ``plm_eval_mode`` the language model stays in eval mode.

        Raises:
            ValueError: ``mode`` is not a bool.
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be a bool")
        self.training = mode
        for module in self.children():
            module.train(mode)
        if self.plm_eval_mode:
            # after the children: a template holds the model's input embedding as a submodule too
            self.plm.eval()
        return self

    def prepare_model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The language model's keyword arguments for ``batch``: processed by the template, then only the
        entries its ``forward`` names."""
        processed = self.template.process_batch(_copy_batch(batch))
        return {key: processed[key] for key in processed if key in self.forward_keys}

    def forward(self, batch: Mapping[str, Any], output_hidden_states: bool = False) -> Any:
        """Run the language model on a batch (template processing before and after).

        Args:
            batch: the batch from a :class:`~opendelta_dist.prompts.PromptDataLoader` (not modified).
            output_hidden_states: ask the model for its hidden states too (only when its ``forward`` takes them).

        Returns:
            The language model's output, after ``template.post_processing_outputs``.
        """
        inputs = self.prepare_model_inputs(batch)
        if output_hidden_states and ("output_hidden_states" in self.forward_keys or self._takes_kwargs):
            inputs["output_hidden_states"] = True
        outputs = self.plm(**inputs)
        return self.template.post_processing_outputs(outputs)


class _AroundPromptModel(nn.Module):
    """What the prompt pipelines read from the :class:`PromptModel` they hold as ``prompt_model``."""

    prompt_model: PromptModel

    @property
    def plm(self) -> nn.Module:
        """The language model."""
        return self.prompt_model.plm

    @property
    def template(self) -> nn.Module:
        """The template."""
        return self.prompt_model.template

    @property
    def device(self) -> torch.device:
        """The language model's device."""
        return _module_device(self.plm)


class PromptForClassification(_AroundPromptModel):
    """A prompt model whose verbalizer turns the mask's outputs into class scores.

    Args:
        plm: the language model.
        template: the template.
        verbalizer: the verbalizer.
        freeze_plm: see :class:`PromptModel`.
        plm_eval_mode: see :class:`PromptModel`.
        logits_at_mask_only: project only the prediction positions' hidden states to the vocabulary (when
            the verbalizer reads nothing but those logits; see :class:`_VocabularyAtMask`). The scores are
            the same up to float rounding (the projection multiplies fewer rows at once), the cost of the
            output layer and its logits shrinks from every position to the masks. Off by default, so that
            the scores equal those of the full logits bit for bit; the training tasks turn it on.
    """

    def __init__(
        self,
        plm: nn.Module,
        template: nn.Module,
        verbalizer: nn.Module,
        freeze_plm: bool = False,
        plm_eval_mode: bool = False,
        *,
        logits_at_mask_only: bool = False,
    ) -> None:
        super().__init__()
        self.prompt_model = PromptModel(plm, template, freeze_plm, plm_eval_mode)
        self.verbalizer = verbalizer
        self.logits_at_mask_only = logits_at_mask_only

    @property
    def tokenizer(self) -> Any:
        """The verbalizer's tokenizer."""
        return self.verbalizer.tokenizer

    def extract_at_mask(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The outputs at the positions where ``batch["loss_ids"] > 0``.

        Outputs longer than the batch's rows (positions a soft prompt put in front of them) lose their
        first positions.

        Args:
            outputs: ``[batch, seq, dim]``.
            batch: the batch.

        Returns:
            ``[batch, dim]`` with one mask per example, ``[batch, masks, dim]`` with several.

        Raises:
            WrappingError: a row has no prediction position, or the rows have different numbers of them.
        """
        positions = batch["loss_ids"] > 0
        counts = positions.sum(dim=-1)
        if counts.numel() and (counts.min() == 0 or counts.min() != counts.max()):
            rows = [int(i) for i in torch.nonzero(counts != counts.max()).flatten()] or list(range(len(counts)))
            raise WrappingError(
                f"every example needs the same number of prediction positions (loss_ids > 0); rows {rows[:5]} "
                f"have {[int(counts[r]) for r in rows[:5]]}, others {int(counts.max())}. A position is lost when "
                "truncation cuts the text before the mask: put fixed text between the text and the mask, or raise "
                "max_seq_length"
            )
        extra = outputs.shape[1] - positions.shape[1]
        if extra > 0:
            outputs = outputs[:, extra:]
        elif extra < 0:
            raise WrappingError(
                f"the model's outputs have {outputs.shape[1]} positions, fewer than the batch's {positions.shape[1]}"
            )
        at_mask = outputs[positions].view(positions.shape[0], -1, outputs.shape[-1])
        return at_mask.view(at_mask.shape[0], at_mask.shape[2]) if at_mask.shape[1] == 1 else at_mask

    def _outputs_at_mask(self, batch: Mapping[str, Any]) -> Any:
        # Verbalizer.needs_hidden_states: true when gather_outputs is overridden; other verbalizers get them
        hidden = getattr(self.verbalizer, "needs_hidden_states", True)
        with _VocabularyAtMask(self, batch, self.logits_at_mask_only) as vocabulary:
            outputs = self.verbalizer.gather_outputs(self.prompt_model(batch, output_hidden_states=hidden))
        if vocabulary.masks is not None:  # the logits are already those of the prediction positions
            return outputs.view(outputs.shape[0], outputs.shape[-1]) if vocabulary.masks == 1 else outputs
        if isinstance(outputs, tuple):
            return [self.extract_at_mask(o, batch) for o in outputs]
        return self.extract_at_mask(outputs, batch)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class scores ``[batch, classes]`` for a batch."""
        return self.verbalizer.process_outputs(self._outputs_at_mask(batch), batch=batch)

    def forward_without_verbalize(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """What the verbalizer reads, at the mask (e.g. the vocabulary logits ``[batch, vocab]``)."""
        return self._outputs_at_mask(batch)

    def parallelize(self, device_map: Any = None) -> None:
        """Spread the language model over devices with its own ``parallelize`` (older transformers' T5/GPT-2).

        Raises:
            PromptError: the language model has no ``parallelize``.
        """
        if not hasattr(self.plm, "parallelize"):
            raise PromptError(f"{type(self.plm).__name__} has no parallelize(): load it with device_map='auto' instead")
        self.plm.parallelize(device_map)
        self.device_map = self.plm.device_map
        self.template.to(self.device)
        self.verbalizer.to(self.device)

    def deparallelize(self) -> None:
        """Undo :meth:`parallelize`.

        Raises:
            PromptError: the language model has no ``deparallelize``.
        """
        if not hasattr(self.plm, "deparallelize"):
            raise PromptError(f"{type(self.plm).__name__} has no deparallelize()")
        self.plm.deparallelize()
        self.device_map = None
        self.template.cpu()
        self.verbalizer.cpu()


def _select(batch: Any, keep: Any) -> Any:
    """A copy of ``batch`` (its type kept) with ``keep(value)`` of every entry; entries it maps to None are dropped."""
    picked = _copy_batch(batch)
    for key in list(picked.keys()):
        value = keep(picked[key])
        if value is None and type(picked) is dict:
            del picked[key]
        else:
            picked[key] = value  # an InputFeatures drops a key set to None
    return picked


def _rows(batch: Any, index: list[int], size: int) -> Any:
    """The rows ``index`` of every per-example entry of a batch (tensors and lists of ``size`` entries)."""

    def keep(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[index]
        if isinstance(value, list) and len(value) == size:
            return [value[i] for i in index]
        return None

    return _select(batch, keep)


class _VocabularyAtMask:
    """With ``enabled`` (``PromptForClassification.logits_at_mask_only``): while the language model runs, its output
    layer (the projection to the vocabulary) reads only the hidden states of the prediction positions
    (``loss_ids > 0``), when the verbalizer reads nothing but the logits there.

    Projecting every position costs more than the rest of a small model (all-MiniLM-L6-v2: 30,522 x 384 per
    position), and all positions but the mask are thrown away. Applies to a verbalizer whose ``gather_outputs``
    is :class:`Verbalizer`'s (the logits), a template that leaves the outputs as they are (``post_processing_outputs``
    is :class:`Template`'s: ``ManualTemplate`` and ``MixedTemplate``, not ``SoftTemplate``, which drops its prepended
    positions from the logits), a model that is not an encoder-decoder, whose ``get_output_embeddings()`` is a linear
    layer and which gives it one row of hidden states per batch position (a ``SoftPromptModel`` delta has taken its
    positions out by then); otherwise, or when rows differ in their number of masks (``extract_at_mask``
    reports that), the layer runs as usual. ``masks`` is the number of masks per row once it applied.
    """

    def __init__(self, model: PromptForClassification, batch: Mapping[str, Any], enabled: bool) -> None:
        self.positions = batch["loss_ids"] > 0 if enabled and "loss_ids" in batch else None
        self.layer = _vocabulary_layer(model) if self.positions is not None else None
        self.masks: int | None = None
        self._handle: Any = None

    def __enter__(self) -> _VocabularyAtMask:
        if self.layer is not None:
            self._handle = self.layer.register_forward_pre_hook(self._keep_mask_rows)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _keep_mask_rows(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden, positions = args[0], self.positions
        assert positions is not None
        if self.masks is not None or hidden.dim() != 3 or hidden.shape[:2] != positions.shape:
            return None
        counts = positions.sum(dim=-1)
        if not counts.numel() or counts.min() == 0 or counts.min() != counts.max():
            return None
        self.masks = int(counts[0])
        rows = hidden[positions.to(hidden.device)].view(hidden.shape[0], self.masks, hidden.shape[-1])
        return (rows, *args[1:])


def _vocabulary_layer(model: PromptForClassification) -> nn.Module | None:
    """The language model's output layer when :class:`_VocabularyAtMask` may narrow it (see there), else None."""
    verbalizer, template = model.verbalizer, model.template
    if not isinstance(verbalizer, Verbalizer) or type(verbalizer).gather_outputs is not Verbalizer.gather_outputs:
        return None
    if not isinstance(template, Template) or (
        type(template).post_processing_outputs is not Template.post_processing_outputs
    ):
        return None
    if getattr(getattr(model.plm, "config", None), "is_encoder_decoder", False):
        return None
    get_output_embeddings = getattr(model.plm, "get_output_embeddings", None)
    layer = get_output_embeddings() if callable(get_output_embeddings) else None
    return layer if isinstance(layer, nn.Linear) else None


class PromptForGeneration(_AroundPromptModel):
    """A prompt model for text generation: a teacher-forced loss to train, ``generate`` to predict.

    Args:
        plm: the language model (encoder-decoder or decoder-only, with ``generate``).
        template: the template.
        freeze_plm: see :class:`PromptModel`.
        plm_eval_mode: see :class:`PromptModel`.
        gen_config: generation options (e.g. ``max_length``, ``num_beams``) made the model's defaults: set
            on its ``generation_config`` (the other keys on its ``config``).
        tokenizer: the tokenizer (default the template's); its pad and eos ids are generate's defaults.

    Raises:
        PromptError: no tokenizer given and the template has none.
    """

    def __init__(
        self,
        plm: nn.Module,
        template: nn.Module,
        freeze_plm: bool = False,
        plm_eval_mode: bool = False,
        gen_config: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.freeze_plm = freeze_plm
        self.tokenizer = tokenizer if tokenizer is not None else getattr(template, "tokenizer", None)
        if self.tokenizer is None:
            raise PromptError("PromptForGeneration needs a tokenizer: pass tokenizer=..., or a template that has one")
        self.prompt_model = PromptModel(plm, template, freeze_plm, plm_eval_mode)
        self.loss_fct = nn.CrossEntropyLoss(reduction="none")
        self.config = plm.config
        self.gen_config = dict(gen_config or {})
        generation_config = getattr(plm, "generation_config", None)
        for key, value in self.gen_config.items():
            setattr(generation_config if hasattr(generation_config, key) else self.config, key, value)
        self.main_input_name = self.prompt_model.main_input_name

    @staticmethod
    def shift_logits_and_labels(
        logits: torch.Tensor, loss_ids: torch.Tensor, reference_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of positions ``0..n-2`` and, as labels, the next tokens where ``loss_ids > 0`` (else -100)."""
        shift_logits = logits[..., :-1, :].contiguous()
        labels = torch.where(loss_ids[..., 1:] > 0, reference_ids[..., 1:], -100)
        return shift_logits, labels

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The teacher-forced loss: cross-entropy summed over each example's target tokens, averaged over the batch.

        The targets are the tokens where ``loss_ids > 0`` (of ``decoder_input_ids`` for encoder-decoder
        models, of ``input_ids`` otherwise), each predicted from the position before it.
        """
        reference = batch["decoder_input_ids"] if self.config.is_encoder_decoder else batch["input_ids"]
        logits = self.prompt_model(batch).logits
        logits, labels = self.shift_logits_and_labels(logits, batch["loss_ids"], reference)
        loss = self.loss_fct(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device))
        return loss.view(logits.shape[0], -1).sum(dim=-1).mean()

    def generate(
        self, batch: Mapping[str, Any], verbose: bool = False, **generation_kwargs: Any
    ) -> tuple[list[list[int]], list[str]]:
        """Generate a continuation of every example with the language model's ``generate``.

        Encoder-decoder models generate the batch at once, from the decoder inputs up to the first
        prediction position (``<pad> <extra_id_0>``); rows whose prediction starts elsewhere are
        generated in their own call. Decoder-only models generate one example at a time from its real
        tokens (``input_ids_len``), so right padding never sits between a prompt and its continuation.

        Args:
            batch: the batch (not modified).
            verbose: log the generated sentences.
            generation_kwargs: passed to the model's ``generate`` as they are (``max_length``,
                ``num_beams``, ...); transformers rejects those it does not know. ``pad_token_id`` and
                ``eos_token_id`` default to the tokenizer's.

        Returns:
            The generated sequences (their prefix, the decoder's start or the example's tokens, included)
            and the generated sentences (prefix dropped, cut at the first eos, stripped).

        Raises:
            PromptError: the language model cannot generate.
        """
        if not hasattr(self.plm, "generate"):
            raise PromptError(f"{type(self.plm).__name__} has no generate(): use a transformers generation model")
        special = {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        kwargs = {**{k: v for k, v in special.items() if v is not None}, **generation_kwargs}
        if self.config.is_encoder_decoder:
            sequences, lengths = self._generate_encoder_decoder(batch, kwargs)
        else:
            sequences, lengths = self._generate_decoder_only(batch, kwargs)
        sentences = self.post_processing(sequences, lengths)
        if verbose:
            logger.info("Generated: %s", sentences)
        return sequences, sentences

    def _generate_encoder_decoder(
        self, batch: Mapping[str, Any], kwargs: dict[str, Any]
    ) -> tuple[list[list[int]], list[int]]:
        starts = batch["loss_ids"].argmax(dim=-1).tolist()
        size = len(starts)
        sequences: list[list[list[int]]] = [[] for _ in range(size)]
        lengths: list[list[int]] = [[] for _ in range(size)]
        # one call per distinct start position (one call for the usual batch, where all start at <extra_id_0>)
        for start in sorted(set(starts)):
            index = [i for i, s in enumerate(starts) if s == start]
            rows = _rows(batch, index, size)
            rows["decoder_input_ids"] = rows["decoder_input_ids"][:, : start + 1]
            inputs = self._generation_inputs(rows)
            out = self.plm.generate(**inputs, **kwargs).tolist()
            per_row = len(out) // len(index)
            for j, i in enumerate(index):
                sequences[i] = out[j * per_row : (j + 1) * per_row]
                lengths[i] = [start + 1] * per_row
        return list(itertools.chain.from_iterable(sequences)), list(itertools.chain.from_iterable(lengths))

    def _generate_decoder_only(
        self, batch: Mapping[str, Any], kwargs: dict[str, Any]
    ) -> tuple[list[list[int]], list[int]]:
        input_ids = batch["input_ids"]
        size, length = input_ids.shape[:2]
        if "input_ids_len" in batch:
            real_lengths = [int(n) for n in batch["input_ids_len"]]
        else:
            real_lengths = (input_ids != self.tokenizer.pad_token_id).sum(dim=-1).tolist()
        sequences: list[list[int]] = []
        lengths: list[int] = []
        for i, n in enumerate(real_lengths):
            row = _select(
                batch,
                lambda v, i=i, n=n: (
                    v[i : i + 1, :n] if isinstance(v, torch.Tensor) and v.shape[:2] == (size, length) else None
                ),
            )
            inputs = self._generation_inputs(row)
            out = self.plm.generate(**inputs, **kwargs).tolist()
            # from embeddings, generate() returns the new tokens only: put the example's tokens before them
            prefix = row["input_ids"][0].tolist() if "inputs_embeds" in inputs else []
            sequences.extend(prefix + seq for seq in out)
            lengths.extend([n] * len(out))
        return sequences, lengths

    def _generation_inputs(self, rows: Mapping[str, Any]) -> dict[str, Any]:
        inputs = self.prompt_model.prepare_model_inputs(rows)
        inputs = {k: v for k, v in inputs.items() if v is not None and k not in _DECODER_STATE_KEYS}
        if "inputs_embeds" in inputs:
            inputs.pop("input_ids", None)
        return inputs

    def post_processing(self, output_sequences: list[list[int]], input_lengths: int | list[int]) -> list[str]:
        """Sentences from generated sequences: drop each prefix, decode, cut at the first eos, strip.

        Args:
            output_sequences: the generated sequences.
            input_lengths: the length of each sequence's prefix (one int for all).

        Returns:
            The sentences.
        """
        if isinstance(input_lengths, int):
            input_lengths = [input_lengths] * len(output_sequences)
        eos = getattr(self.tokenizer, "eos_token", None)
        sentences = []
        for seq, n in zip(output_sequences, input_lengths):
            text = self.tokenizer.decode(seq[n:], clean_up_tokenization_spaces=True, skip_special_tokens=eos is None)
            if eos is not None and eos in text:
                text = text[: text.index(eos)]
            sentences.append(text.strip())
        return sentences
