"""The bmt extra and backend where there is no GPU: installed where nvcc is, importable, refusing clearly."""

from __future__ import annotations

import os
import re

import pytest
import transformers as T

from opendelta_dist import LoraModel, PrefixModel, SoftPromptModel
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.structure import FAMILIES, ROLES, role_keys
from opendelta_dist.train.modelcenter_t5 import hf_to_modelcenter_name
from tests.bmt.common import BMT_INSTALLED, NO_BMT, needs_bmt, nvcc_present
from tests.models import build


def test_the_set_up_installs_the_bmt_extra_where_nvcc_is():
    """Where nvcc is, the set-up builds BMTrain. CI requires it (OPENDELTA_REQUIRE_BMT=1, .ci/run): without it the
    bmt tier would skip, and CI would be green without testing the bmt backend and engine."""
    if os.environ.get("OPENDELTA_REQUIRE_BMT") == "1":
        assert nvcc_present(), "OPENDELTA_REQUIRE_BMT=1 but no nvcc here: the CUDA toolkit is needed to build BMTrain"
        assert BMT_INSTALLED, "OPENDELTA_REQUIRE_BMT=1 but the set-up did not install BMTrain (scripts/install-bmt.sh)"
    if not nvcc_present():
        pytest.skip("no nvcc here: the set-up does not build BMTrain (scripts/install-bmt.sh needs the CUDA toolkit)")
    if os.environ.get("OPENDELTA_BMT") == "0":
        pytest.skip("OPENDELTA_BMT=0: the set-up was asked not to install the bmt extra")
    assert BMT_INSTALLED, "nvcc is here but bmtrain/model_center are not installed: run bash scripts/install-bmt.sh"
    import bmtrain
    import model_center.model

    assert bmtrain.C.is_bf16_supported()  # the compiled extension loads, with its CUDA kernels
    assert hasattr(model_center.model, "T5")


@needs_bmt
def test_a_bmt_delta_without_initialised_bmtrain_is_refused_with_the_fix():
    with pytest.raises(DeltaConfigError, match=r"bmtrain\.init_distributed\(\).*backend='hf'"):
        LoraModel(build("t5"), backend="bmt")


@needs_bmt
@pytest.mark.parametrize("method", [PrefixModel, SoftPromptModel])
def test_methods_needing_transformers_modules_refuse_bmt_by_name(method):
    assert "bmt" not in method.supported_backends()
    with pytest.raises(DeltaConfigError, match=rf"{method.__name__} .*'transformers'.* backend 'bmt'"):
        method(build("t5"), backend="bmt")


@needs_bmt
def test_the_bmt_backend_is_available_and_names_modelcenter_t5_roles():
    from opendelta_dist.backends import available_backends, get_backend
    from opendelta_dist.backends.bmt import MODELCENTER_T5

    assert "bmt" in available_backends()
    assert "bmt" in LoraModel.supported_backends()
    roles = get_backend("bmt").families[MODELCENTER_T5]
    assert set(roles) <= set(ROLES)


@pytest.mark.skipif(not BMT_INSTALLED, reason=NO_BMT)
@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_each_role_on_modelcenter_t5_is_where_the_conversion_puts_transformers_modules(feed_forward):
    """The bmt role table against the name conversion: a role's modules on transformers' T5, converted,
    are exactly those the role matches among ModelCenter's names (every converted module name)."""
    from opendelta_dist.backends.bmt import MODELCENTER_T5, T5_ROLES

    config = T.T5Config(d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2, feed_forward_proj=feed_forward)
    model = T.T5ForConditionalGeneration(config)
    converted = {}
    for name, _ in model.named_modules():
        try:
            converted[name] = hf_to_modelcenter_name(name)
        except DeltaConfigError:
            continue
    assert len(converted) > 20
    for role in T5_ROLES:
        if role not in FAMILIES["t5"]:
            continue
        on_hf = set()
        for key in role_keys(model, [role]):
            pattern = re.compile(key[len("[r]") :])
            on_hf |= {name for name in converted if pattern.fullmatch(name)}
        expected = {converted[name] for name in on_hf}
        mc_pattern = re.compile(rf"(?:.*\.)?(?:{T5_ROLES[role]})")
        found = {mc for mc in converted.values() if mc_pattern.fullmatch(mc)}
        assert found == expected, role
    assert MODELCENTER_T5 == "model_center.model.t5.T5"


@needs_bmt
def test_modules_inside_a_bmtrain_block_are_addressable():
    """A BMTrain ``Block`` keeps its layer outside ``_modules``; the layer's modules are found by name below it,
    as ModelCenter's T5 names them (``encoder.layers.0.self_att...``)."""
    import bmtrain as bmt
    from torch import nn

    from opendelta_dist.addressing import select_modules

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_att = nn.Module()
            self.self_att.project_q = nn.Linear(4, 4)
            self.ffn = nn.Linear(4, 4)

    root = nn.Module()
    root.layers = nn.ModuleList([bmt.Block(Layer(), initialized=True) for _ in range(2)])
    assert select_modules(root, ["project_q"]) == ["layers.0.self_att.project_q", "layers.1.self_att.project_q"]


def test_the_decoder_start_token_is_t5s_padding_token_when_the_config_has_none():
    from opendelta_dist.train.engines.bmt import decoder_start_token_id

    config = T.T5Config(pad_token_id=7)
    config.__dict__.pop("decoder_start_token_id", None)  # transformers 5 sets it only when it is given
    assert decoder_start_token_id(config) == 7
    assert decoder_start_token_id(T.T5Config(pad_token_id=0, decoder_start_token_id=3)) == 3


@needs_bmt
def test_modelcenters_norm_and_gelu_are_eager_so_a_non_reentrant_recomputation_matches_its_forward():
    """BMTrain checkpoints a block none of whose inputs requires a gradient (the first encoder block) without
    reentrance, which checks that the recomputation saves what the forward saved. A TorchScript function there
    (ModelCenter's RMS norm and tanh GELU are scripted) fails that backward; the engine's eager ones pass, with
    the same values."""
    import model_center.layer.feedforward as feedforward
    import model_center.layer.layernorm as layernorm
    import torch
    from torch.utils.checkpoint import checkpoint

    from opendelta_dist.train.modelcenter_t5 import _gelu_tanh, _rms_norm, use_eager_kernels

    torch.manual_seed(0)
    linear, weight = torch.nn.Linear(16, 16), torch.rand(16)

    def backward_through(norm) -> None:
        def block(x):
            return norm(linear(x), weight, 1e-6)

        first = checkpoint(block, torch.randn(2, 8, 16), use_reentrant=False)  # its input requires no gradient
        checkpoint(block, first, use_reentrant=True).sum().backward()

    with pytest.raises(RuntimeError):
        backward_through(torch.jit.script(_rms_norm))
    backward_through(_rms_norm)

    use_eager_kernels()
    assert layernorm.rms_layernorm is _rms_norm and feedforward.gelu_new is _gelu_tanh
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    scripted_norm = torch.jit.script(_rms_norm)
    assert torch.equal(_rms_norm(x, weight.bfloat16(), 1e-6), scripted_norm(x, weight.bfloat16(), 1e-6))
    torch.testing.assert_close(_gelu_tanh(x.float()), torch.nn.functional.gelu(x.float(), approximate="tanh"))


def test_after_a_restart_no_rank_reads_the_last_attempts_nccl_id(monkeypatch):
    """BMTrain publishes its NCCL id under a fixed key of torchrun's store, which outlives a restart: before
    BMTrain starts again, rank 0 deletes the old id, and the other ranks wait until it has."""
    import threading
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from opendelta_dist.train.engines.bmt import BMTRAIN_ID_KEY, forget_last_attempts_nccl_id
    from opendelta_dist.train.topology import Topology
    from tests.train.distributed import free_port

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    store.set(BMTRAIN_ID_KEY, "the failed attempt's id")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    ranks = [Topology(r, 2, r, torch.device("cpu")) for r in range(2)]

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first attempt: nothing stale, nothing to wait for
    forget_last_attempts_nccl_id(ranks[1])
    assert store.check([BMTRAIN_ID_KEY])

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = threading.Thread(target=forget_last_attempts_nccl_id, args=(ranks[1],))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive(), "rank 1 went on before rank 0 removed the stale id"
    forget_last_attempts_nccl_id(ranks[0])
    second.join(timeout=10)
    assert not second.is_alive()
    assert not store.check([BMTRAIN_ID_KEY])


@needs_bmt
@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_the_emulated_bf16_adam_is_bmtrains_kernel(scale):
    """The CUDA emulation's bf16 Adam (``tests/bmt/emulated_cuda.py``, after BMTrain's ``adam_cuda.cu``) against
    BMTrain's own compiled CPU kernel, which computes the same fp32 arithmetic: masters and moments equal bit for
    bit over five steps; the bf16 weights are the masters rounded to nearest (CUDA's conversion; the CPU kernel
    truncates instead)."""
    import bmtrain.optim._function as kernels
    import torch

    from tests.bmt.emulated_cuda import adam_bf16

    torch.manual_seed(0)
    n, args = 4096, (0.9, 0.999, 1e-8, 1e-2, scale, 0.01)
    start = torch.randn(n) * 0.05
    ours = [start.clone(), start.bfloat16(), torch.zeros(n), torch.zeros(n)]
    theirs = [start.clone(), start.bfloat16(), torch.zeros(n), torch.zeros(n)]
    for step in range(1, 6):
        grad = (torch.randn(n) * 1e-2 * scale).bfloat16()
        adam_bf16(ours[0], ours[1], grad, ours[2], ours[3], *args, 1 - 0.9**step, 1 - 0.999**step)
        kernels.adam_cpu(theirs[0], theirs[1], None, grad, theirs[2], theirs[3], *args, step)
    for mine, reference in zip(ours[::2] + ours[3:], theirs[::2] + theirs[3:], strict=True):
        assert torch.equal(mine, reference)
    assert torch.equal(ours[1], theirs[0].bfloat16())
