"""Activation memory: what autograd keeps for backward, per block and outside the blocks, by formula.

One formula per block layout (:attr:`~opendelta_dist.families.Architecture.family`: ``t5``, ``bert``,
``gpt2``, ``llama``), built from the saves of the layers inside it. Attention is a fused kernel
(:func:`fused_attention_saves`), except on an engine that declares eager attention: the ``bmt`` engine's
ModelCenter T5 keeps its scores (:func:`eager_attention_saves`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opendelta_dist.estimate.blocks import BlockInfo
from opendelta_dist.estimate.errors import EstimateError
from opendelta_dist.families import Architecture


@dataclass(frozen=True)
class Shapes:
    """The batch one GPU processes per forward.

    Attributes:
        batch: sequences (the micro batch).
        input_tokens: input (encoder) length; every batch is assumed padded to it.
        target_tokens: target (decoder) length of a seq2seq model, 0 otherwise.
        bytes: bytes of the compute dtype.
    """

    batch: int
    input_tokens: int
    target_tokens: int
    bytes: int


def activation_saves(activation: str) -> int:
    """How many ``tokens x d_ff`` tensors an activation function keeps for backward.

    ``relu`` keeps its output, ``gelu``/``gelu_pytorch_tanh``/``silu`` their input (one fused kernel each);
    ``gelu_new`` (transformers' Python tanh formula) keeps its input, the ``tanh`` output and the two factors
    of its last product; ``quick_gelu`` its input and the sigmoid. Unknown names count as one.
    """
    return {"gelu_new": 4, "quick_gelu": 2}.get(activation, 1)


def rms_norm_saves(tokens: int, d_model: int, nbytes: int, weight_trains: bool) -> int:
    """Bytes an RMS norm (T5's, Llama's) keeps besides its input.

    It squares an fp32 copy of its input (kept when the input is not fp32 already), keeps the fp32 reciprocal
    root per token, and keeps the normalised tensor when its weight trains.
    """
    upcast = tokens * d_model * 4 if nbytes < 4 else 0
    return upcast + tokens * 4 + (tokens * d_model * nbytes if weight_trains else 0)


def layer_norm_saves(tokens: int) -> int:
    """Bytes ``nn.LayerNorm`` keeps besides its input: the fp32 mean and reciprocal deviation per token."""
    return 2 * tokens * 4


def fused_attention_saves(
    batch: int, heads: int, q_len: int, k_len: int, head_dim: int, nbytes: int, mask_elements: int
) -> int:
    """Bytes a fused scaled-dot-product attention (flash / memory-efficient kernel) keeps for backward.

    Query, key, value and output (in the compute dtype), the fp32 log-sum-exp per query and head, and the
    additive mask it was given (T5's position bias folded into it). No ``q_len x k_len`` probabilities are
    stored: attention dropout is regenerated from a seed. (The eager path and CPU attention with dropout
    store the probabilities instead: see :func:`eager_attention_saves`; this estimate is for the fused GPU
    kernels.)
    """
    qo = 2 * batch * heads * q_len * head_dim * nbytes
    kv = 2 * batch * heads * k_len * head_dim * nbytes
    return qo + kv + batch * heads * q_len * 4 + mask_elements * nbytes


def eager_attention_saves(
    batch: int, heads: int, q_len: int, k_len: int, head_dim: int, nbytes: int, dropout: float
) -> int:
    """Bytes ModelCenter's eager attention (``model_center/layer/attention.py``, ``Attention.forward``) keeps.

    Query, key and value (the ``.contiguous()`` copies the two matmuls read), and at the size of the scores
    (``batch x heads x q_len x k_len``): the softmax's output and the probabilities the second matmul reads (the
    dropout's output, or the masked softmax output without dropout) in the compute dtype, and the dropout's
    boolean mask (one byte an element on CUDA; CPU dropout keeps its noise in the compute dtype instead). Each
    of the two ``masked_fill`` calls keeps its own boolean ``batch x 1 x q_len x k_len`` mask
    (``attention_mask == False`` is computed twice); the position bias is added, which keeps nothing. Unlike
    the fused kernel it keeps no log-sum-exp and not its output.
    """
    qkv = batch * heads * (q_len + 2 * k_len) * head_dim * nbytes
    scores = batch * heads * q_len * k_len
    return qkv + 2 * scores * nbytes + dropout_saves(scores, 1, dropout) + 2 * batch * q_len * k_len


def dropout_saves(tokens: int, width: int, rate: float) -> int:
    """Bytes a dropout keeps: its boolean mask (one byte per element) when it is active."""
    return tokens * width if rate > 0 else 0


def _site(block: BlockInfo, site: str, tokens: int, width: int, nbytes: int) -> int:
    """Bytes kept for a site: its tensor (when a linear layer reading it trains) and its LoRAs' hidden ranks.

    Pass ``width=0`` for a site whose tensor is kept anyway: the attention output projection reads the fused
    kernel's output, which the kernel keeps (its ``(batch, tokens, heads, head_dim)`` layout makes the
    transposed ``.contiguous()`` a view). Eager attention keeps no output: its projection's input counts whole.
    """
    if site not in block.sites:
        return 0
    return tokens * width * nbytes + tokens * block.lora_rank.get(site, 0) * nbytes


def _feed_forward(arch: Architecture, block: BlockInfo, tokens: int, nbytes: int) -> dict[str, int]:
    """The feed-forward's activation, its dropout, and the output projection's input when it must be kept.

    A gated feed-forward also keeps the linear branch and the activation's output (the two factors of the
    gate's product). The output projection's input is kept anyway when it is a ReLU output without dropout.
    """
    f = arch.d_ff
    saves = activation_saves(arch.activation) + (2 if arch.gated else 0)
    terms = {"feed-forward activation": saves * tokens * f * nbytes}
    # only T5 drops out between the activation and the output projection
    terms["feed-forward dropout"] = dropout_saves(tokens, f, arch.dropout) if arch.family == "t5" else 0
    kept = not arch.gated and arch.activation == "relu" and arch.dropout == 0
    mid = _site(block, "ff_mid", tokens, f, nbytes)
    terms["feed-forward output input"] = mid - (tokens * f * nbytes if kept and mid else 0)
    return terms


def t5_block_saves(
    arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool, eager_attention: bool = False
) -> dict[str, int]:
    """Bytes one T5 block keeps for backward, by term.

    Pre-norm sub-layers (RMS norm, attention or feed-forward, dropout, residual add). With fused attention
    (transformers' T5) the encoder's self-attention mask is the padded ``batch x heads x input x input``
    position bias; the decoder's self-attention mask is the causal ``heads x target x target`` bias (batches
    carry no decoder padding mask); cross-attention's is ``batch x heads x target x input``. With eager
    attention (ModelCenter's T5) each attention keeps its scores instead (:func:`eager_attention_saves`).
    Frozen linear layers keep nothing of their own; a site's input is kept when a layer reading it trains or
    has a LoRA.
    """
    b, p = shapes.batch, shapes.bytes
    n = shapes.target_tokens if block.kind == "decoder" else shapes.input_tokens
    t, d, h = b * n, arch.d_model, arch.n_heads

    def attention(k_len: int, mask: int) -> int:
        if eager_attention:
            return eager_attention_saves(b, h, n, k_len, arch.head_dim, p, arch.dropout)
        return fused_attention_saves(b, h, n, k_len, arch.head_dim, p, mask)

    out_width = arch.attention_dim if eager_attention else 0
    norm = rms_norm_saves(t, d, p, block.norm_weight_trains)
    self_mask = h * n * n if block.kind == "decoder" else b * h * n * n
    grad_in = checkpointing or block.input_grad
    # a decoder block that trains nothing, on a stream that needs no gradient: the gradient starts at its
    # cross-attention (the encoder's output needs one), and its self-attention keeps nothing
    quiet = not (block.input_grad or block.trains)
    terms = {
        "block input": t * d * p if grad_in else 0,
        "self-attention norm": norm if grad_in and not quiet else 0,
        "self-attention input": _site(block, "attn_in", t, d, p),
        "self-attention": 0 if quiet else attention(n, self_mask),
        "self-attention output input": _site(block, "attn_out", t, out_width, p),
        "self-attention dropout": 0 if quiet else dropout_saves(t, d, arch.dropout),
    }
    if block.kind == "decoder":
        s = shapes.input_tokens
        terms |= {
            "cross-attention block input": 0 if quiet else t * d * p,
            "cross-attention norm": 0 if quiet else norm,
            "cross-attention input": _site(block, "cross_in", t, d, p),
            "cross-attention": attention(s, b * h * n * s),
            "cross-attention output input": _site(block, "cross_out", t, out_width, p),
            "cross-attention key/value LoRA": _site(block, "encoder_out", b * s, 0, p),
            "cross-attention dropout": dropout_saves(t, d, arch.dropout),
        }
    terms |= {
        "feed-forward block input": t * d * p,
        "feed-forward norm": norm,
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "feed-forward output dropout": dropout_saves(t, d, arch.dropout),
        "other deltas": t * block.delta_per_token * p,
    }
    return terms


def bert_block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one BERT-style (post-norm) block keeps for backward, by term.

    The block's input is the previous block's normalised output: kept only when the attention projections
    train or carry a LoRA. The padding mask becomes a ``batch x 1 x input x input`` additive mask per block.
    """
    b, p, n = shapes.batch, shapes.bytes, shapes.input_tokens
    t, d = b * n, arch.d_model
    return {
        "block input": _site(block, "attn_in", t, d, p),
        "self-attention": fused_attention_saves(b, arch.n_heads, n, n, arch.head_dim, p, b * n * n),
        "self-attention output input": _site(block, "attn_out", t, 0, p),
        "self-attention dropout": dropout_saves(t, d, arch.dropout),
        "attention norm": t * d * p + layer_norm_saves(t),
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "feed-forward output dropout": dropout_saves(t, d, arch.dropout),
        "feed-forward norm": t * d * p + layer_norm_saves(t),
        "other deltas": t * block.delta_per_token * p,
    }


def gpt2_block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one GPT-2 (pre-norm, ``Conv1D``) block keeps for backward, by term.

    Query, key and value are views of one projection output (as large as the three); with the key/value
    cache on (no gradient checkpointing) key and value are also copied into the cache.
    """
    b, p, n = shapes.batch, shapes.bytes, shapes.input_tokens
    t, d = b * n, arch.d_model
    cache = 2 * t * arch.attention_dim * p if arch.use_cache and not checkpointing else 0
    attention = fused_attention_saves(b, arch.n_heads, n, n, arch.head_dim, p, b * n * n) + cache
    return {
        "block input": t * d * p + layer_norm_saves(t) if checkpointing or block.input_grad else 0,
        "self-attention input": _site(block, "attn_in", t, d, p),
        "self-attention": attention,
        "self-attention output input": _site(block, "attn_out", t, 0, p),
        "self-attention dropout": dropout_saves(t, d, arch.dropout),
        "feed-forward block input": t * d * p + layer_norm_saves(t),
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "feed-forward output dropout": dropout_saves(t, d, arch.dropout),
        "other deltas": t * block.delta_per_token * p,
    }


def llama_block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one Llama-style (pre-RMS-norm, rotary, SwiGLU) block keeps for backward, by term.

    Keys and values are expanded to every query head before the attention kernel (grouped-query attention
    costs no less activation memory here); the padding mask is ``batch x 1 x input x input`` per block.
    """
    b, p, n = shapes.batch, shapes.bytes, shapes.input_tokens
    t, d = b * n, arch.d_model
    norm = rms_norm_saves(t, d, p, block.norm_weight_trains)
    grad_in = checkpointing or block.input_grad
    return {
        "block input": t * d * p if grad_in else 0,
        "self-attention norm": norm if grad_in else 0,
        "self-attention input": _site(block, "attn_in", t, d, p),
        "self-attention": fused_attention_saves(b, arch.n_heads, n, n, arch.head_dim, p, b * n * n),
        "self-attention output input": _site(block, "attn_out", t, 0, p),
        "feed-forward block input": t * d * p,
        "feed-forward norm": norm,
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "other deltas": t * block.delta_per_token * p,
    }


def block_saves(
    arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool, eager_attention: bool = False
) -> dict[str, int]:
    """Bytes one block keeps for backward, by term, for the block's family.

    A block whose input needs no gradient (a stack's first block on frozen embeddings, or a block above
    blocks that train nothing) keeps nothing of its input (with gradient checkpointing it keeps it only as the
    checkpoint's input); a block no gradient runs through (below the lowest block that trains: a delta's
    ``leave_out``) keeps nothing at all.

    Raises:
        EstimateError: eager attention asked of a family other than T5 (it is ModelCenter's T5's).
    """
    if eager_attention:
        if arch.family != "t5":
            raise EstimateError(
                f"eager attention is modelled for ModelCenter's T5 (the bmt engine trains T5 only), not for a "
                f"{arch.family} model: estimate it with engine=fsdp, deepspeed, ddp or single"
            )
        terms = t5_block_saves(arch, block, shapes, checkpointing, eager_attention=True)
        return dict.fromkeys(terms, 0) if block.idle else terms
    family = {"t5": t5_block_saves, "bert": bert_block_saves, "gpt2": gpt2_block_saves, "llama": llama_block_saves}
    terms = family[arch.family](arch, block, shapes, checkpointing)
    return dict.fromkeys(terms, 0) if block.idle else terms


def block_backward_transient(
    arch: Architecture, block: BlockInfo, shapes: Shapes, eager_attention: bool = False
) -> int:
    """The gradients alive at once while one block runs backward, on top of what it keeps.

    The gradient of the block's output and of its residual stream (two ``tokens x d_model``), plus the
    larger of the feed-forward's two inner gradients (``tokens x d_ff`` each; three for a gated one) and the
    attention's query, key, value and output gradients. Eager attention adds one gradient at the size of its
    largest scores: each step back through its probabilities (matmul, dropout, ``masked_fill``, softmax) makes
    a new score-sized gradient while its input gradient is alive, and frees one saved score-sized tensor after.
    """
    if block.idle:
        return 0
    p = shapes.bytes
    n = shapes.target_tokens if block.kind == "decoder" else shapes.input_tokens
    t = shapes.batch * n
    ff = (3 if arch.gated else 2) * t * arch.d_ff * p
    attention = 4 * t * arch.attention_dim * p
    if eager_attention:
        k_len = max(n, shapes.input_tokens) if block.kind == "decoder" else n
        attention += t * arch.n_heads * k_len * p
    return 2 * t * arch.d_model * p + max(ff, attention)


def outside_block_saves(
    arch: Architecture, blocks: Sequence[BlockInfo], shapes: Shapes, checkpointing: bool
) -> dict[str, int]:
    """Bytes kept for backward outside the blocks: final norms, the embeddings' norm or dropout when their
    output needs a gradient (the embeddings train, or a soft prompt), and with gradient checkpointing the
    inputs every checkpointed block shares.

    T5 with checkpointing shares the encoder output, the position biases (``heads x input x input``,
    ``heads x target x target``, ``heads x target x input``) and the boolean padding masks; the other
    families share their boolean padding mask. Without checkpointing the encoder output is kept only when
    a cross-attention key/value projection trains or has a LoRA.
    """
    b, p, s = shapes.batch, shapes.bytes, shapes.input_tokens
    d, h, te = arch.d_model, arch.n_heads, b * s
    terms: dict[str, int] = {}
    embeddings_grad = any(blk.first and blk.input_grad for blk in blocks)
    if arch.family == "t5":
        tt = shapes.batch * shapes.target_tokens
        tgt = shapes.target_tokens
        norms = rms_norm_saves(te, d, p, False) + rms_norm_saves(tt, d, p, False)
        terms["embedding dropout"] = dropout_saves(te + tt, d, arch.dropout) if embeddings_grad else 0
        terms["final norms"] = (te + tt) * d * p + norms + dropout_saves(te + tt, d, arch.dropout)
        cross_kv = any("encoder_out" in blk.sites for blk in blocks)
        terms["encoder output"] = te * d * p if checkpointing or cross_kv else 0
        if checkpointing:
            terms["position biases"] = h * (s * s + tgt * tgt + tgt * s) * p
            terms["padding masks"] = b * s * s + b * tgt * s
        return terms
    t = te
    if arch.family == "bert":
        norm = t * d * p + layer_norm_saves(t) + dropout_saves(t, d, arch.dropout)
        terms["embeddings norm"] = norm if embeddings_grad else 0
    elif arch.family == "gpt2":
        terms["embedding dropout"] = dropout_saves(t, d, arch.dropout) if embeddings_grad else 0
        terms["final norm"] = t * d * p + layer_norm_saves(t)
    else:
        terms["final norm"] = t * d * p + rms_norm_saves(t, d, p, False)
        terms["rotary cos/sin"] = 2 * s * arch.head_dim * p
    if checkpointing:
        terms["padding mask"] = b * s * s
    return terms


def loss_buffers(arch: Architecture, shapes: Shapes, seq2seq: bool) -> int:
    """Bytes of the logits and the loss at their peak (seq2seq models; a classifier's logits are tiny).

    The LM head's ``batch x target x vocab`` logits, the cross-entropy's log-softmax (kept for backward), then
    in backward the log-softmax's gradient and the logits' gradient: three such tensors at once, in the
    compute dtype (T5 takes the loss of its logits without an fp32 copy).
    """
    if not seq2seq:
        return 0
    return 3 * shapes.batch * shapes.target_tokens * arch.vocab_size * shapes.bytes


@dataclass
class ActivationEstimate:
    """Activation memory of one training step on one GPU.

    Attributes:
        kept: bytes kept across the step (every block's saved tensors, or with checkpointing the blocks'
            inputs), with the tensors kept outside the blocks.
        recompute: bytes of the largest block's recomputed saved tensors (gradient checkpointing), else 0.
        backward: bytes of that block's gradients alive at once during its backward (without checkpointing:
            less what the blocks after it had freed by then).
        loss: bytes of the logits and loss buffers at their peak.
        terms: the largest block's saved tensors by term, and the outside terms.
    """

    kept: int
    recompute: int
    backward: int
    loss: int
    terms: dict[str, int]

    @property
    def block_peak(self) -> int:
        """Kept activations plus the largest block's recomputation and backward."""
        return self.kept + self.recompute + self.backward

    @property
    def loss_excess(self) -> int:
        """Bytes the loss buffers add above the block peak (they are not alive at the same time)."""
        return max(0, self.loss - self.recompute - self.backward)


def estimate_activations(
    arch: Architecture,
    blocks: Sequence[BlockInfo],
    shapes: Shapes,
    checkpointing: bool,
    seq2seq: bool,
    eager_attention: bool = False,
) -> ActivationEstimate:
    """Activation memory of a training step, with or without gradient checkpointing.

    Without checkpointing every block's saved tensors stay until its backward; the peak adds the gradients
    of one block's backward less what the blocks after it freed (or the loss buffers, whichever is larger).
    With checkpointing (non-reentrant, or BMTrain's blocks) each block keeps only its inputs (its output is
    the next block's input); in backward one block at a time recomputes its forward, keeping its saved
    tensors again, and runs its backward.

    Args:
        arch: the backbone's architecture.
        blocks: its blocks (:func:`describe_blocks`).
        shapes: the micro batch.
        checkpointing: gradient checkpointing of every block.
        seq2seq: the model computes an LM loss over ``target_tokens`` (else a classifier's).
        eager_attention: attention keeps its scores (ModelCenter's T5, :func:`eager_attention_saves`) rather
            than being a fused kernel.

    Returns:
        The estimate.

    Raises:
        EstimateError: eager attention asked of a family other than T5.
    """
    per_block = [block_saves(arch, blk, shapes, checkpointing, eager_attention) for blk in blocks]
    outside = outside_block_saves(arch, blocks, shapes, checkpointing)
    transients = [block_backward_transient(arch, blk, shapes, eager_attention) for blk in blocks]
    if checkpointing:
        # the block's input is the checkpoint's own input: recomputing does not allocate it again
        peaks = [sum(t.values()) - t["block input"] + tr for t, tr in zip(per_block, transients, strict=True)]
        worst = max(range(len(blocks)), key=peaks.__getitem__)
        recompute = sum(per_block[worst].values()) - per_block[worst]["block input"]
        kept = sum(block_input_bytes(arch, blk, shapes) for blk in blocks) + sum(outside.values())
    else:
        # backward runs the blocks in reverse and frees each block's saved tensors after its backward: a
        # block's gradients rise above the start of backward by its transient less what later blocks freed
        kept = sum(sum(t.values()) for t in per_block) + sum(outside.values())
        recompute, freed = 0, 0
        for i in reversed(range(len(blocks))):
            transients[i], freed = max(0, transients[i] - freed), freed + sum(per_block[i].values())
        worst = max(range(len(blocks)), key=transients.__getitem__)
    terms = {f"{blocks[worst].kind} block: {k}": v for k, v in per_block[worst].items() if v}
    terms |= {f"outside blocks: {k}": v for k, v in outside.items() if v}
    return ActivationEstimate(kept, recompute, transients[worst], loss_buffers(arch, shapes, seq2seq), terms)


def block_input_bytes(arch: Architecture, block: BlockInfo, shapes: Shapes) -> int:
    """Bytes of a block's input hidden states: what a checkpointed block keeps (nothing when idle)."""
    if block.idle:
        return 0
    n = shapes.target_tokens if block.kind == "decoder" else shapes.input_tokens
    return shapes.batch * n * arch.d_model * shapes.bytes
