"""The backend contract: every delta method runs through the backend protocol alone, on every backend.

Each installed backend, and the sharded reference backend of ``tests/backends/sharded.py`` (whose
parameters, the backbone's included, are flat, padded partitions that modules gather on access), must
give every method exactly what ``hf`` gives: the same outputs, the same gradients, the same statistics,
and the same checkpoint (tensors, backbone hash and fingerprint), which loads on a plain backbone.
A method that read a partition as if it were the whole tensor, or made a parameter without the
backend, fails here.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from opendelta_dist import AutoDeltaModel
from opendelta_dist.backends import available_backends, backend_of, full_numel, full_tensor
from opendelta_dist.deltas.prefix import PrefixLayer
from opendelta_dist.inspect import inspect_module_statistics
from opendelta_dist.registry import DELTA_METHODS
from opendelta_dist.saving import read_config_file
from tests.backends import sharded
from tests.models import batch, build, logits

sharded.register()
#: bmt's DistributedParameters live on a GPU, under initialised BMTrain: its cases run there (marked gpu), and in CI
#: under the CUDA emulation (tests/bmt/test_emulated.py)
ON_GPU = {"bmt"}
BACKENDS = [
    pytest.param(name, marks=[pytest.mark.gpu, pytest.mark.emulated]) if name in ON_GPU else name
    for name in sorted({*available_backends(), sharded.NAME})
]
OPTIONS = {
    "compacter": {"reduction_factor": 4},
    "prefix": {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16},
    "soft_prompt": {"soft_token_num": 4},
}
FAMILIES = ("t5", "gpt2")  # an encoder-decoder with nn.Linear, a decoder with Conv1D's (in, out) weights


def _built(method: str, family: str, backend: str, device: str = "cpu"):
    model = build(family).to(device)
    if backend == sharded.NAME:
        sharded.shard_model(model)
    torch.manual_seed(1234)  # the same delta initialisation on every backend
    delta = DELTA_METHODS[method](model, backend=backend, **OPTIONS.get(method, {}))
    delta.freeze_module(exclude=["deltas"])
    return model, delta


def _full_grads(delta) -> dict[str, torch.Tensor]:
    grads = {}
    for key, param in delta.named_delta_tensors():
        shape = backend_of(param).full_shape(param)
        grads[key] = param.grad.reshape(-1)[: shape.numel()].view(shape)
    return grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(DELTA_METHODS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_method_runs_through_the_protocol_alone(backend, method, family, tmp_path):
    device = "cpu"
    if backend in ON_GPU:
        from tests.bmt.common import init_bmtrain

        init_bmtrain()
        device = "cuda"
    if backend not in DELTA_METHODS[method].supported_backends():
        pytest.skip(f"{method} needs what the {backend} backend lacks (refusal tested below)")
    ref_model, ref_delta = _built(method, family, "hf", device)
    model, delta = _built(method, family, backend, device)
    inputs = {k: v.to(device) for k, v in batch(family).items()}

    assert {k: full_tensor(p) for k, p in delta.named_delta_tensors()}.keys() == dict(
        ref_delta.named_delta_tensors()
    ).keys()
    for (key, p), (_, ref) in zip(delta.named_delta_tensors(), ref_delta.named_delta_tensors(), strict=True):
        assert torch.equal(full_tensor(p), ref.detach()), f"{key} initialised differently"
        assert full_numel(p) == ref.numel()
    assert delta.num_trainable_parameters() == ref_delta.num_trainable_parameters()
    stats, ref_stats = inspect_module_statistics(model, False), inspect_module_statistics(ref_model, False)
    assert stats == ref_stats

    torch.testing.assert_close(logits(model, inputs), logits(ref_model, inputs), rtol=0, atol=1e-6)
    for m in (model, ref_model):
        m.train()
        m(**inputs).loss.backward()
    ref_grads = {k: p.grad for k, p in ref_delta.named_delta_tensors()}
    for key, grad in _full_grads(delta).items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-5, atol=1e-7, msg=f"gradient of {key}")

    delta.save_finetuned(tmp_path / "delta")
    ref_delta.save_finetuned(tmp_path / "ref")
    saved, ref_saved = (
        load_file(tmp_path / "delta" / "delta_model.safetensors"),
        load_file(tmp_path / "ref" / "delta_model.safetensors"),
    )
    assert saved.keys() == ref_saved.keys()
    assert all(torch.equal(saved[k], ref_saved[k]) for k in saved)
    config, ref_config = read_config_file(tmp_path / "delta"), read_config_file(tmp_path / "ref")
    for key in ("backbone_hash", "backbone_fingerprint"):
        assert config[key] == ref_config[key], f"{key} read a partition"

    plain = build(family).to(device)  # the checkpoint records its backend; a plain backbone takes it with backend="hf"
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=plain, backend="hf")
    torch.testing.assert_close(logits(plain, inputs), logits(model, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(DELTA_METHODS))
def test_a_delta_layer_gathers_each_parameter_once_a_call(method, family):
    """Where parameters are sharded, every read of one is an all-gather (BMTrain's ``DistributedModule``
    gathers on attribute access as the reference backend does): in one forward, a delta parameter is read
    no more often than its module is called, not once more for its dtype or shape. A holder that is not
    called is read once (the soft prompt), or once per layer it serves (prefix tuning's shared network:
    each prefixed attention computes its own rows)."""
    if sharded.NAME not in DELTA_METHODS[method].supported_backends():
        pytest.skip(f"{method} needs what the sharded backend lacks")
    model, delta = _built(method, family, sharded.NAME)
    ours = {id(p) for _, p in delta.named_delta_tensors()}
    modules = {id(m): (name, m) for name, m in model.named_modules()}
    calls: Counter[int] = Counter()
    hooks = [m.register_forward_pre_hook(lambda m, _: calls.update([id(m)])) for m in model.modules()]
    sharded.READS.clear()
    with torch.no_grad():
        model(**batch(family))
    for hook in hooks:
        hook.remove()
    reads = {
        (modules[m][0], attr): n
        for (m, attr), n in sharded.READS.items()
        if m in modules and id(modules[m][1]._parameters.get(attr)) in ours
    }
    assert reads, "the forward read no delta parameter"
    served = sum(isinstance(m, PrefixLayer) for m in model.modules()) or 1
    calls_of = {name: calls[m] or served for m, (name, _) in modules.items()}
    extra = {key: (n, calls_of[key[0]]) for key, n in reads.items() if n > calls_of[key[0]]}
    assert not extra, f"(module, parameter): (reads, calls) {extra}"


def test_a_method_needing_what_a_backend_lacks_is_refused_by_name():
    from opendelta_dist import PrefixModel
    from opendelta_dist.errors import DeltaConfigError

    with pytest.raises(DeltaConfigError, match=r"PrefixModel .*'transformers'.* backend 'bmt'"):
        PrefixModel(build("gpt2"), backend="bmt")


def test_the_structure_graph_shows_whole_shapes_on_a_sharded_backend():
    from opendelta_dist import Visualization

    model, _ = _built("lora", "t5", sharded.NAME)
    graph = Visualization(model).structure_text(expand_params=True)
    ref_model, _ = _built("lora", "t5", "hf")
    # the same tree and shapes; the sharded backend's module classes are named Sharded<Class>
    assert graph.replace("Sharded", "") == Visualization(ref_model).structure_text(expand_params=True)
    assert "lora_A:[8,32]" in graph.replace(" ", "")


class _UnreadableBackend(sharded.ShardedReferenceBackend):
    """Owns the tensors marked ``_unreadable`` and cannot read them whole (as BMTrain's in-block weights)."""

    name = "unreadable-reference"

    def owns(self, tensor):
        return hasattr(tensor, "_unreadable")

    def full_shape(self, param):
        return param.shape

    def full_tensor(self, param):
        from opendelta_dist.errors import WholeValueUnavailableError

        raise WholeValueUnavailableError("a backbone weight is whole only inside its block's forward")


def test_a_delta_saves_where_the_backend_cannot_read_backbone_weights_whole(tmp_path):
    """The checkpoint records the backbone's structure; the values the backend cannot read are left out of
    the fingerprint (NaN), so the delta loads on a plain backbone of that structure, checked."""
    import numpy as np

    from opendelta_dist.backends import register_backend
    from opendelta_dist.saving import SAMPLES_PER_TENSOR, backbone_checksum

    register_backend(_UnreadableBackend.name, _UnreadableBackend())
    model, delta = _built("lora", "t5", "hf")
    unreadable = {"encoder.block.0.layer.1.DenseReluDense.wi.weight", "decoder.final_layer_norm.weight"}
    for name, p in model.named_parameters():
        if name in unreadable:
            p._unreadable = True
    structure, values = backbone_checksum(model)
    ref_structure, ref_values = backbone_checksum(build("t5"))
    assert structure == ref_structure
    missing = np.isnan(values) & ~np.isnan(ref_values)
    assert missing.sum() == sum(min(SAMPLES_PER_TENSOR, n) for n in (37 * 32, 32))  # wi [37, 32], the norm [32]
    np.testing.assert_array_equal(values[~np.isnan(values)], ref_values[~np.isnan(values)])
    delta.save_finetuned(tmp_path / "delta")
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=build("t5"), backend="hf")
