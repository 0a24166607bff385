"""The ``bmt`` engine: BMTrain (ZeRO-3 blocks, its fused Adam) on ModelCenter's T5, with a delta of the bmt backend.

The engine builds the backbone itself (:meth:`BMTEngine.build_backbone`): ModelCenter's T5 from the recipe's
transformers T5 configuration, in ``model.dtype``, on this process's GPU, every transformer layer a BMTrain
``Block`` whose weights are partitioned over the ranks and gathered only around its forward and backward
(activations recomputed in backward). The weights are those of transformers' T5 converted into ModelCenter's
layout (:mod:`opendelta_dist.train.modelcenter_t5`): the pretrained ones (``model.name_or_path``, read one
layer at a time from the memory-mapped checkpoint files, so that no rank holds the whole model on the CPU), or, for a
random-weight model, transformers' initialisation drawn from the run's seed exactly as the other engines draw it
(on ``model.init_device``, the CPU or this GPU), so a run starts from the same backbone whichever engine trains it;
with ``model.init_device=meta`` and no checkpoint, ModelCenter's own initialisers fill it on the GPU instead (a
model too big to hold twice, e.g. T5-11B in a benchmark).
BMTrain's initialisation re-seeds every generator; it is undone, so the draws that follow (the delta's) are those
of the other engines as well. The recipe then attaches the delta with ``backend="bmt"`` (its parameters are
``DistributedParameter``s outside the blocks' storage) and freezes the rest.

**Frozen weights get no gradient storage.** ModelCenter wraps its layers in ``Block``s while building the model,
before anything is frozen, so each block's storage of weights is marked trainable, and BMTrain would allocate
a full-size gradient buffer for it in every backward and keep a partition-size gradient of the whole block
(about 2 bytes per backbone parameter: 22 GB for T5-11B on one GPU) although no weight of it trains.
:meth:`BMTEngine.prepare` therefore marks every storage of which no parameter is trainable as not requiring a
gradient, which is what BMTrain reads to decide (``Block._storage_params``); a storage that still holds a
trainable weight (``unfrozen_modules``) keeps its gradient.

The optimizer is BMTrain's ``AdamOptimizer`` (or ``AdamOffloadOptimizer``, ``offload=true``: states and fp32
masters in CPU memory) over the trainable parameters only, stepped by an ``OptimManager``: bf16 and fp32 train
without loss scaling; fp16 with dynamic loss scaling from ``loss_scale`` (a skipped step on overflow). The
loss goes backward through ``OptimManager.backward``, which divides by the number of ranks: the
reduce-scatter that brings gradients home sums them. Saved deltas carry transformers' names
(``encoder.block.0.layer.0.SelfAttention.q.lora.lora_A``), so they load with ``AutoDeltaModel.from_finetuned``
onto a transformers T5.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from opendelta_dist.backends import full_numel, full_tensor
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines.base import TRAINING_STATE, Engine, OptimizerSpec, check_precision
from opendelta_dist.train.engines.memory import Backbone, EngineMemory, Row, ceil_div, dtype_name
from opendelta_dist.train.modelcenter_t5 import hf_to_modelcenter_name, modelcenter_to_hf_name

IGNORE_INDEX = -100
FP16_LOSS_SCALE = 2.0**20
"""The first loss scale of fp16 training when ``loss_scale`` is not given."""
#: marks the optimizer's group of fp32 parameters, whose weight decay the engine applies (decoupled, as AdamW)
DECOUPLED = "opendelta_decoupled_weight_decay"
ADAM_FP32_STATES = 3
"""BMTrain's Adam keeps an fp32 master copy and two fp32 moments of each bf16/fp16 parameter."""


#: where ``bmtrain.init_distributed`` publishes its NCCL id in the launcher's store (BMTrain 1.0.1's fixed key)
BMTRAIN_ID_KEY = "bmtrain/BMTRAIN_UNIQUE_ID"


def forget_last_attempts_nccl_id(topology: Any, timeout: timedelta = timedelta(minutes=30)) -> None:
    """Remove the NCCL id an earlier attempt of this run left in torchrun's store, before BMTrain starts.

    ``bmtrain.init_distributed`` has rank 0 publish a new NCCL id under a fixed key of the launcher's store and
    the other ranks read it. The store outlives a torchrun restart, so after one a rank could read the failed
    attempt's id before rank 0 replaces it, and wait forever for peers that never come. Rank 0 deletes the key
    and says so under a key of this attempt; the others wait for that before they start BMTrain (and then for
    the new id). Nothing to do for one process or a first attempt.

    Args:
        topology: this process's rank and the world size.
        timeout: how long a rank waits for rank 0.
    """
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if topology.world_size == 1 or attempt == "0" or "MASTER_ADDR" not in os.environ:
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), topology.world_size, is_master=False, timeout=timeout
    )
    forgotten = f"opendelta_dist/attempt{attempt}/bmtrain_id_forgotten"
    if topology.rank == 0:
        store.delete_key(BMTRAIN_ID_KEY)
        store.set(forgotten, "1")
    else:
        store.wait([forgotten])


def decoder_start_token_id(config: Any) -> int:
    """The token transformers' T5 starts its decoder with: the config's ``decoder_start_token_id``, which a
    transformers 5 ``T5Config`` has only when it was given, else T5's convention, the padding token."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    return int(start or 0)


def _modelcenter_inputs(batch: Mapping[str, torch.Tensor], start: int, pad: int) -> dict[str, torch.Tensor]:
    """A transformers seq2seq batch (``input_ids``, ``attention_mask``, ``labels``) as ModelCenter T5's inputs."""
    labels = batch["labels"]
    decoder = torch.full_like(labels, start)
    decoder[:, 1:] = labels[:, :-1]
    decoder = decoder.masked_fill(decoder == IGNORE_INDEX, pad)
    mask = batch.get("attention_mask")
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": mask if mask is not None else torch.ones_like(batch["input_ids"]),
        "decoder_input_ids": batch.get("decoder_input_ids", decoder),
        "decoder_attention_mask": batch.get("decoder_attention_mask", torch.ones_like(labels)),
    }


class _Output:
    """What the recipe reads of a forward: ``loss`` and ``logits`` (transformers' output has them too)."""

    def __init__(self, loss: torch.Tensor, logits: torch.Tensor) -> None:
        self.loss = loss
        self.logits = logits


class BMTEngine(Engine):
    """BMTrain on ModelCenter's T5; see the module docstring.

    Args:
        topology: this process's rank, world size and GPU.
        offload: keep Adam's states and fp32 master weights in CPU memory (``AdamOffloadOptimizer``).
        loss_scale: fp16 only: the first dynamic loss scale (default 2**20); bf16 and fp32 use none.
        precision: ``"bf16"`` or ``"fp16"``: the dtype ModelCenter's T5 is built and computes in (its
            weights and the delta; Adam keeps fp32 masters); None for ``model.dtype``.
    """

    name = "bmt"
    splits_model = True
    own_models = True
    delta_backend: ClassVar[str] = "bmt"
    precisions: ClassVar[tuple[str, ...]] = ("bf16", "fp16")

    def __init__(
        self, topology: Any, offload: bool = False, loss_scale: float | None = None, precision: str | None = None
    ) -> None:
        super().__init__(topology)
        self.dtype = check_precision(self.name, precision, self.precisions)
        self.precision = precision
        self.offload = offload
        self.loss_scale = loss_scale
        self.manager: Any = None
        self.hf_config: Any = None
        self.frozen_storages = 0
        self.backbone_samples: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- the backbone

    def _init_bmtrain(self) -> None:
        if self.topology.device.type != "cuda":
            raise DeltaConfigError(
                "the bmt engine trains on CUDA GPUs (BMTrain has no CPU path): run with device=cuda on a GPU "
                "machine, or train on the CPU with engine=ddp or engine=fsdp"
            )
        try:
            import bmtrain as bmt
        except ImportError as exc:
            raise DeltaConfigError(
                f"the bmt engine needs BMTrain and ModelCenter ({exc}): install them with bash scripts/install-bmt.sh"
            ) from exc
        if not bmt.config.get("initialized", False):
            import random

            forget_last_attempts_nccl_id(self.topology)

            # BMTrain seeds torch (CPU and GPU), random and numpy with its ``seed``: the recipe seeded them
            # already, and what they drew since (data, ...) must not be drawn again, so they are put back
            states = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[self.topology.device]):
                # under torchrun: the ranks meet through the agent's store, as torch's own process group does
                bmt.init_distributed(seed=torch.initial_seed() % 2**32)
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.backends.cudnn.enabled = True  # BMTrain turns cuDNN off; T5 has no convolution either way

    def build_backbone(self, config: Any) -> nn.Module:
        """ModelCenter's T5 of the recipe's model configuration, on this GPU (see the module docstring).

        Args:
            config: the recipe's :class:`~opendelta_dist.train.models.ModelConfig` (a transformers T5).

        Raises:
            DeltaConfigError: no GPU or no BMTrain, a model other than a T5 for generation, or weights that do
                not fit ModelCenter's T5.
        """
        from dataclasses import replace

        from opendelta_dist.operations import pristine_named_parameters
        from opendelta_dist.saving import sample_values
        from opendelta_dist.train.modelcenter_t5 import (
            hf_to_modelcenter,
            local_checkpoint,
            modelcenter_config,
            modelcenter_state_groups,
            use_eager_kernels,
        )
        from opendelta_dist.train.models import DTYPES, build_model, model_architecture

        self._init_bmtrain()
        import bmtrain as bmt
        from model_center.model import T5

        if config.dtype not in DTYPES:
            raise DeltaConfigError(f"unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
        hf_config = model_architecture(config)
        if hf_config.model_type != "t5" or config.task != "seq2seq":
            raise DeltaConfigError(
                f"the bmt engine trains T5 for generation (ModelCenter's T5), not a {hf_config.model_type} for "
                f"{config.task}: use engine=fsdp or engine=deepspeed for this model"
            )
        self.hf_config = hf_config
        dtype = self.dtype or DTYPES[config.dtype]
        use_eager_kernels()
        model = T5(modelcenter_config(hf_config, dtype))
        if not config.name_or_path and config.init_device == "meta":
            # random weights of a model too big to build twice: ModelCenter's own initialisers, on the GPU
            bmt.init_parameters(model)
            self._set_dummy_inputs(model)
            return model
        if config.name_or_path:
            # every rank reads the checkpoint one layer at a time, memory-mapped (one copy per machine, in the
            # page cache), and keeps its partitions of each tensor
            expected = set(model.load_state_dict({}, strict=False).missing_keys)
            loaded: set[str] = set()
            unexpected: list[str] = []
            for part in modelcenter_state_groups(local_checkpoint(config.name_or_path), hf_config, dtype):
                unexpected += model.load_state_dict(part, strict=False).unexpected_keys
                loaded.update(part)
            missing = sorted(expected - loaded)
        else:
            # random weights drawn from the seed as every engine draws them: every rank builds transformers' T5
            # and keeps its partitions of it
            dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
            where = "cpu" if config.init_device == "meta" else config.init_device
            source = build_model(replace(config, dtype=dtype_name, init_device=where, gradient_checkpointing=False))
            state = hf_to_modelcenter(source.state_dict(), hf_config)
            # the values a saved delta's fingerprint keeps of this backbone, under transformers' names
            self.backbone_samples = {name: sample_values(p) for name, p in pristine_named_parameters(source)}
            del source
            missing, unexpected = model.load_state_dict(state, strict=False)
            del state
        if missing or unexpected:
            raise DeltaConfigError(
                f"the weights of {config.name_or_path or 'transformers T5'} do not fit ModelCenter's T5: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )
        self._set_dummy_inputs(model)
        return model

    @classmethod
    def check_delta_options(cls, options: Mapping[str, Any]) -> None:
        """ModelCenter's T5 names its modules otherwise than transformers' T5: modules are named by their roles,
        so that the saved delta loads on transformers' T5 too (the method's defaults are roles).

        Raises:
            DeltaConfigError: ``modified_modules`` given as module names.
        """
        if options.get("modified_modules") is not None and not options.get("common_structure"):
            raise DeltaConfigError(
                f"the bmt engine's T5 (ModelCenter's) names its modules otherwise than transformers' T5, so "
                f"delta.modified_modules={list(options['modified_modules'])} must be roles: pass "
                "delta.common_structure=true with role names (e.g. 'delta.modified_modules=[attn.q,attn.v]'), or "
                "delta.modified_modules=null for the method's default roles"
            )

    def saved_delta_config(self) -> dict[str, Any]:
        """A saved delta is for transformers' T5 (its tensors whole, under transformers' names): it records the
        ``hf`` backend and transformers' class, so that it loads there as it is."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as names

        assert self.hf_config is not None, "build_backbone() first"
        return {"backend": "hf", "backbone_class": names[self.hf_config.model_type]}

    @staticmethod
    def _set_dummy_inputs(model: nn.Module) -> None:
        """The inputs of the hidden-size probe of adapters (its forward is a collective: every rank runs it)."""
        ids = torch.tensor([[1, 2, 3]], device="cuda")
        model.delta_dummy_inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "decoder_input_ids": ids,
            "decoder_attention_mask": torch.ones_like(ids),
        }

    def backbone_checksum(self, model: nn.Module, delta: DeltaBase) -> tuple[str, np.ndarray]:
        """The checksum of the transformers T5 the saved delta is for: the structure of transformers' T5 of the
        same configuration, and the values sampled of the transformers T5 the weights were converted from (a
        random-weight model). A pretrained checkpoint's values, read one layer at a time, and ModelCenter's own
        initialisation (``init_device=meta`` without a checkpoint) are not sampled: loading such a delta
        compares the structure only.
        """
        import transformers

        from opendelta_dist.saving import backbone_checksum

        with torch.device("meta"):
            reference = transformers.AutoModelForSeq2SeqLM.from_config(self.hf_config)
        replaced = {modelcenter_to_hf_name(name) for name in delta.replaced_parameter_names()}
        return backbone_checksum(reference, replaced, samples=self.backbone_samples)

    # ----------------------------------------------------------------- set-up

    def _freeze_storages(self, module: nn.Module) -> None:
        from bmtrain.block_layer import Block

        for block in module.modules():
            if not isinstance(block, Block):
                continue
            for kw, storage in block._storage_params.items():
                trains = any(info["parameter"].requires_grad for info in block._param_info if info["kw_name"] == kw)
                if storage.requires_grad and not trains:
                    storage.requires_grad_(False)
                    self.frozen_storages += 1

    def prepare(self, module: nn.Module, delta: DeltaBase | None, spec: OptimizerSpec) -> None:
        """Drop the gradient storage of frozen blocks, build BMTrain's Adam over the trainable parameters.

        Raises:
            DeltaConfigError: no delta (full fine-tuning), a delta not of the bmt backend, modules named
                otherwise than by roles, or an optimizer other than AdamW.
        """
        import bmtrain as bmt

        if delta is None or delta.backend != "bmt":
            raise DeltaConfigError(
                "the bmt engine trains a delta of the bmt backend (backend='bmt'); full fine-tuning runs on engine=ddp"
            )
        self.check_delta_options(delta.config.to_dict())
        if spec.name != "adamw":
            raise DeltaConfigError(f"the bmt engine steps BMTrain's Adam: use optim.name=adamw, not {spec.name!r}")
        self.spec = spec
        self.module = self.model = module
        self._freeze_storages(module)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = bmt.optim.AdamOffloadOptimizer if self.offload else bmt.optim.AdamOptimizer
        # BMTrain's Adam decays fp16 and bf16 weights as AdamW does, but fp32 ones through torch's functional
        # Adam, as an L2 term of the gradient: those get no decay there, and AdamW's in optimizer_step
        groups = [
            {"params": [p for p in params if p.dtype != torch.float32]},
            {"params": [p for p in params if p.dtype == torch.float32], "weight_decay": 0.0, DECOUPLED: True},
        ]
        self.optimizer = optimizer(
            [g for g in groups if g["params"]],
            lr=spec.lr,
            betas=tuple(spec.betas),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
        )
        self.scheduler = spec.build_scheduler(self.optimizer)
        fp16 = any(p.dtype == torch.float16 for p in params)
        scale = (self.loss_scale or FP16_LOSS_SCALE) if fp16 else None
        self.manager = bmt.optim.OptimManager(loss_scale=scale)
        # the manager steps the schedule, and only with the optimizer: a step skipped on an fp16 overflow
        # leaves the learning rate where it was
        self.manager.add_optimizer(self.optimizer, self.scheduler)

    def optimized_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the optimizer's groups."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def optimized_numel(self) -> int:
        """Elements of the optimized parameters at their whole (not partition) size."""
        return sum(full_numel(p) for p in self.optimized_parameters())

    # ----------------------------------------------------------------- training

    def _forward(self, batch: Mapping[str, torch.Tensor]) -> _Output:
        assert self.model is not None and self.hf_config is not None
        config = self.hf_config
        inputs = _modelcenter_inputs(batch, decoder_start_token_id(config), config.pad_token_id or 0)
        logits = self.model(**inputs, output_logits=True, return_dict=True).logits
        labels = batch["labels"]
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return _Output(loss, logits)

    def micro_step(self, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
        """Forward, then backward through the ``OptimManager`` (loss scale, division by the ranks)."""
        loss = self._forward(batch).loss
        self.manager.backward(loss / self.spec.grad_accum)
        return loss.detach()

    def optimizer_step(self) -> float | None:
        """Clip the global gradient norm, step and schedule (both skipped on an fp16 overflow, which lowers the
        loss scale instead), zero the gradients."""
        import bmtrain as bmt

        norm = None
        if self.spec.max_grad_norm is not None:
            norm = float(self.manager.clip_grad_norm(self.optimizer.param_groups, self.spec.max_grad_norm))
        # AdamW's decay of the fp32 weights, of their values before the step and at this step's learning rate
        decay = [
            (p, p.detach() * (group["lr"] * self.spec.weight_decay))
            for group in self.optimizer.param_groups
            if group.get(DECOUPLED) and self.spec.weight_decay
            for p in group["params"]
            if p.grad is not None
        ]
        epoch = self.scheduler.last_epoch
        self.manager.step()
        if self.scheduler.last_epoch != epoch and decay:  # not skipped on an fp16 overflow
            with torch.no_grad():
                for p, term in decay:
                    p.sub_(term)
            # BMTrain's next gather reads the partitions on its load stream: after these writes
            bmt.config["load_stream"].wait_stream(torch.cuda.current_stream())
        self.manager.zero_grad()
        return norm

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Forward without gradients; returns ``loss`` and ``logits``."""
        with torch.no_grad():
            return self._forward(batch)

    # ----------------------------------------------------------------- state

    def gather_delta(self, delta: DeltaBase) -> dict[str, torch.Tensor]:
        """The delta's whole tensors on CPU under transformers' names. Collective (every rank all-gathers)."""
        return {modelcenter_to_hf_name(k): full_tensor(p).to("cpu", copy=True) for k, p in delta.named_delta_tensors()}

    def load_delta(self, delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's whole tensors (transformers' names) into the partitions. Collective."""
        from opendelta_dist.saving import load_delta_tensors

        load_delta_tensors(delta, {hf_to_modelcenter_name(k): v for k, v in tensors.items()})

    def save_training_state(self, directory: Path) -> None:
        """Rank ``r`` writes its optimizer partition's state; rank 0 also the schedule and the loss scale."""
        import bmtrain as bmt

        state = {
            "optimizer": self.optimizer.state_dict(),
            "loss_scale": self.manager.loss_scale,
            "steps_since_last_scale": self.manager.steps_since_last_scale,
        }
        torch.save(state, directory / f"bmt_optimizer.rank{bmt.rank()}.pt")
        if bmt.rank() == 0:
            torch.save(
                {"scheduler": self.scheduler.state_dict(), "world_size": bmt.world_size()}, directory / TRAINING_STATE
            )
        bmt.synchronize()

    def load_training_state(self, directory: Path) -> None:
        """Read this rank's optimizer partition and the schedule (same world size only: see :meth:`check_resume`)."""
        import bmtrain as bmt

        shared = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(shared["scheduler"])
        own = torch.load(directory / f"bmt_optimizer.rank{bmt.rank()}.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(own["optimizer"])
        self.manager.loss_scale = own["loss_scale"]
        self.manager.steps_since_last_scale = own.get("steps_since_last_scale", 0)

    @classmethod
    def check_resume(cls, saved_state: Mapping[str, Any], topology: Any) -> None:
        """Refuse another world size: each rank's Adam state is of its own partition.

        Raises:
            DeltaConfigError: the checkpoint was written by another number of processes, or by another engine.
        """
        if saved_state.get("engine") not in (None, cls.name):
            raise DeltaConfigError(
                f"this checkpoint was written by engine={saved_state['engine']}; its optimizer state does not fit "
                "the bmt engine's partitions: resume with that engine, or start a new run from its final delta"
            )
        saved = saved_state.get("world_size")
        if saved is not None and saved != topology.world_size:
            raise DeltaConfigError(
                f"this checkpoint's optimizer state is partitioned over {saved} processes, and this run has "
                f"{topology.world_size}: resume with {saved} processes, or start a new run from its delta"
            )

    def close(self) -> None:
        """Nothing to release: BMTrain's communicator lives as long as the process."""
        return None

    # ----------------------------------------------------------------- memory model

    eager_attention: ClassVar[bool] = True
    """ModelCenter's attention is eager (``model_center/layer/attention.py``): it keeps its softmax output, its
    probabilities and their dropout mask for backward, which the estimator counts instead of a fused kernel's."""
    reads_checkpoints_by_layer: ClassVar[bool] = True
    """:meth:`build_backbone` reads a pretrained T5 one layer at a time from its memory-mapped files."""
    recomputes_blocks: ClassVar[bool] = True
    """Every ModelCenter layer is a BMTrain ``CheckpointBlock``: it keeps its inputs and recomputes its
    activations in backward, whatever ``model.gradient_checkpointing`` says."""

    @classmethod
    def memory_rows(cls, backbone: Backbone, world_size: int, options: Mapping[str, Any]) -> EngineMemory:
        """ZeRO-3 blocks: 1/world of the weights, three blocks gathered, no gradient of frozen weights.

        Each block's weights are a partition of its storage, gathered in full around its forward and its
        backward: the running block and the next one, and the first encoder block for good (its inputs need no
        gradient, so BMTrain's backward hook that releases it never runs). Embeddings, position biases, norms and
        the head outside the blocks are gathered on use; ModelCenter's T5 keeps its LM head apart from the input
        embeddings even where transformers' ties them. Delta parameters and their gradients are partitions,
        gathered around each use; Adam keeps an fp32 master and two fp32 moments of each trainable element (on
        CPU with ``offload``).

        Args:
            backbone: the backbone, as counted by the estimator (transformers' T5).
            world_size: the run's processes.
            options: the engine's options.

        Returns:
            The rows; nothing in the workspace.
        """
        c, w = backbone.counts, world_size
        dtype = cls.compute_dtype(options, backbone.model_dtype)
        itemsize = dtype.itemsize
        stuck = next((b for b in backbone.blocks if b.kind == "encoder" and b.first), None)
        running = sorted((b.unit_numel for b in backbone.blocks if b is not stuck), reverse=True)[:2]
        outside = backbone.root_numel + backbone.tied_head_numel  # ModelCenter's untied head
        gathered = (sum(running) + (stuck.unit_numel if stuck else 0) + outside) * itemsize
        shards = ceil_div((c.frozen_numel + backbone.tied_head_numel) * itemsize, w)
        delta = 3 * ceil_div(c.trainable_numel * itemsize, w)
        optimizer = ADAM_FP32_STATES * 4 * ceil_div(c.trainable_numel, w)
        offload = bool(options.get("offload"))
        return EngineMemory(
            [
                Row(
                    "weights",
                    shards + gathered,
                    0,
                    f"1/{w} partition (the LM head apart), the running and next blocks, the first encoder block "
                    f"(never released) and the parts outside blocks gathered, in {dtype_name(dtype)}",
                ),
                Row("deltas", delta, 0, f"1/{w} partitions of trainable parameters and gradients, one gathered copy"),
                Row(
                    "optimizer",
                    0 if offload else optimizer,
                    optimizer if offload else 0,
                    f"Adam's fp32 master and moments of 1/{w} of the trainable parameters"
                    + (", on CPU" if offload else ""),
                ),
            ]
        )
