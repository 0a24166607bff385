import json

import pytest
import torch

from opendelta_dist import AutoDeltaConfig, AutoDeltaModel, BitFitModel, LoraModel, ParallelAdapterModel
from opendelta_dist.errors import BackboneMismatchError, DeltaCheckpointError, DeltaConfigError
from opendelta_dist.saving import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from tests.models import batch, build, logits


def _trained_lora(tmp_path, **kw):
    model = build("t5")
    delta = LoraModel(model, lora_r=4, lora_alpha=8, **kw)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_()
    path = delta.save_finetuned(tmp_path / "ckpt")
    return model, delta, path


def test_checkpoint_holds_only_the_delta_and_every_option(tmp_path):
    _model, delta, path = _trained_lora(tmp_path, lora_dropout=0.1, unfrozen_modules=["deltas", "lm_head"])
    assert sorted(p.name for p in path.iterdir()) == ["config.json", WEIGHTS_NAME]
    config = json.loads((path / "config.json").read_text())
    assert config["delta_type"] == "lora"
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["backend"] == "hf" and config["unfrozen_modules"] == ["deltas", "lm_head"]
    from safetensors.torch import load_file

    tensors = load_file(path / WEIGHTS_NAME)
    assert set(tensors) == {k for k, _ in delta.named_delta_tensors()}
    assert "lm_head.weight" in tensors  # an unfrozen backbone module is part of the delta
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("lm_head") for k in tensors)


def test_config_round_trip_keeps_every_option():
    for options in (
        {
            "delta_type": "lora",
            "lora_r": 3,
            "lora_alpha": 5.5,
            "lora_dropout": 0.2,
            "backend": "bmt",
            "modified_modules": ["q"],
            "exclude_modules": ["x"],
            "unfrozen_modules": ["deltas"],
            "common_structure": False,
        },
        {
            "delta_type": "parallel_adapter",
            "bottleneck_dim": 7,
            "non_linearity": "relu",
            "scaled": 0.5,
            "modified_modules": ["attn", ["wi", "wo"]],
        },
        {"delta_type": "adapter", "bottleneck_dim": 3, "non_linearity": "tanh"},
        {"delta_type": "bitfit", "modified_modules": ["q"], "backend": "hf"},
    ):
        config = AutoDeltaConfig.from_dict(options)
        again = AutoDeltaConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
        assert {k: v for k, v in again.to_dict().items() if k in options} == options


def test_unknown_option_and_delta_type_are_refused():
    with pytest.raises(DeltaConfigError, match="did you mean 'lora_r'"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rank": 4})
    with pytest.raises(DeltaConfigError, match=r"unknown delta_type 'loraa' \(did you mean 'lora'\?\)"):
        AutoDeltaConfig.from_dict({"delta_type": "loraa"})
    with pytest.raises(DeltaConfigError, match="must be of type"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": "8"})


def test_bf16_delta_loads_on_fp32_backbone(tmp_path):
    model = build("t5").to(torch.bfloat16)
    delta = LoraModel(model)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_()
    delta.save_finetuned(tmp_path / "bf16")
    fresh = build("t5")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "bf16", fresh)
    for (k, a), (_, b) in zip(delta.named_delta_tensors(), loaded.named_delta_tensors()):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b), k


def test_fp16_backbone_hash_works(tmp_path):
    model = build("bert").half()
    LoraModel(model).save_finetuned(tmp_path / "fp16")
    AutoDeltaModel.from_finetuned(tmp_path / "fp16", build("bert"))


def test_different_backbone_is_refused_and_left_untouched(tmp_path):
    _, _, path = _trained_lora(tmp_path)
    other_weights = build("t5", seed=1)
    state = {k: v.clone() for k, v in other_weights.state_dict().items()}
    with pytest.raises(BackboneMismatchError, match=r"other weights.*check_hash=False"):
        AutoDeltaModel.from_finetuned(path, other_weights)
    assert list(other_weights.state_dict()) == list(state)
    assert not any(hasattr(m, "lora") for m in other_weights.modules())
    AutoDeltaModel.from_finetuned(path, other_weights, check_hash=False)  # the user's explicit choice

    with pytest.raises(BackboneMismatchError, match="names and shapes differ"):
        AutoDeltaModel.from_finetuned(path, build("bart"))


def test_corrupted_and_truncated_weights_are_refused(tmp_path):
    _, _, path = _trained_lora(tmp_path)
    weights = path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DeltaCheckpointError, match=r"sha256.*truncated or corrupted"):
        AutoDeltaModel.from_finetuned(path, build("t5"))
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DeltaCheckpointError, match="truncated or corrupted"):
        AutoDeltaModel.from_finetuned(path, build("t5"))
    # without the recorded sha256, safetensors' own parsing still refuses a truncated file
    config = json.loads((path / "config.json").read_text())
    del config["weights_sha256"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaCheckpointError, match="truncated or corrupted"):
        AutoDeltaModel.from_finetuned(path, build("t5"))


def test_missing_or_broken_checkpoint_files(tmp_path):
    with pytest.raises(DeltaCheckpointError, match=r"nope: no such directory, and not a Hub repository id"):
        AutoDeltaModel.from_finetuned(tmp_path / "nope", build("t5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaCheckpointError, match=r"config\.json"):
        AutoDeltaModel.from_finetuned(tmp_path / "empty", build("t5"))
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(DeltaCheckpointError, match="not valid JSON"):
        AutoDeltaModel.from_finetuned(tmp_path / "empty", build("t5"))


def test_loading_with_the_wrong_method_class(tmp_path):
    _, _, path = _trained_lora(tmp_path)
    with pytest.raises(DeltaConfigError, match="load it with LoraModel"):
        BitFitModel.from_finetuned(path, build("t5"))
    assert isinstance(LoraModel.from_finetuned(path, build("t5")), LoraModel)


def test_resave_replaces_files_atomically_and_keeps_other_files(tmp_path):
    _model, delta, path = _trained_lora(tmp_path)
    (path / "notes.txt").write_text("mine")
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.add_(1.0)
    delta.save_finetuned(path)
    assert (path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "delta_model.safetensors", "notes.txt"]
    loaded = AutoDeltaModel.from_finetuned(path, build("t5"))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(delta.named_delta_tensors(), loaded.named_delta_tensors()))


def _opendelta_checkpoint(path, config, state):
    path.mkdir()
    base = {
        "opendelta_version": "0.3.0",
        "transformers_version": "4.23.1",
        "backbone_class": "X",
        "backbone_checkpoint_name": "x",
        "backbone_hash": "0" * 32,
    }
    (path / "config.json").write_text(json.dumps({**base, **config}))
    torch.save(state, path / LEGACY_WEIGHTS_NAME)


def test_opendelta_lora_checkpoint_loads(tmp_path):
    reference = build("t5")
    delta = LoraModel(reference, lora_r=4)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_()
    # OpenDelta 0.3.2 writes the backbone's filtered state dict with torch.save, keyed like this
    state = {k: p.detach().clone() for k, p in delta.named_delta_tensors()}
    _opendelta_checkpoint(
        tmp_path / "od",
        {
            "delta_type": "lora",
            "lora_r": 4,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "modified_modules": ["attn@.q@", "attn@.v@"],
            "common_structure": True,
            "exclude_modules": ["lm_head"],
        },
        state,
    )
    fresh = build("t5")
    AutoDeltaModel.from_finetuned(tmp_path / "od", fresh)
    inputs = batch("t5")
    assert torch.equal(logits(fresh, inputs), logits(reference, inputs))


def test_opendelta_parallel_adapter_pairs_are_read(tmp_path):
    reference = build("t5")
    delta = ParallelAdapterModel(reference, modified_modules=["SelfAttention", ["wi", "wo"]])
    state = {k: p.detach().clone() for k, p in delta.named_delta_tensors()}
    _opendelta_checkpoint(
        tmp_path / "od",
        {
            "delta_type": "parallel_adapter",
            "bottleneck_dim": 24,
            "non_linearity": "gelu_new",
            "scaled": None,
            "modified_modules": ["SelfAttention", "SelfAttention", "wi", "wo"],
        },
        state,
    )
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "od", build("t5"))
    assert loaded.modified_modules == ["SelfAttention", ["wi", "wo"]]


def test_pickled_code_in_an_opendelta_checkpoint_is_not_executed(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')",))

    _opendelta_checkpoint(tmp_path / "od", {"delta_type": "lora"}, {"x": Evil()})
    with pytest.raises(DeltaCheckpointError, match="never arbitrary pickled objects"):
        AutoDeltaModel.from_finetuned(tmp_path / "od", build("t5"))
    assert not marker.exists()


def test_checkpoint_of_other_delta_configuration_is_refused(tmp_path):
    _, _, path = _trained_lora(tmp_path)
    with pytest.raises(DeltaCheckpointError, match="do not fit"):
        AutoDeltaModel.from_finetuned(
            path, build("t5"), delta_config={"delta_type": "lora", "lora_r": 4, "modified_modules": ["q"]}
        )


@pytest.mark.parametrize(
    ("family", "delta_type", "options", "positions"),
    [
        # OpenDelta's "attn" on T5 is the whole self-attention sub-layer, its "ff" the feed-forward one
        (
            "t5",
            "lowrankadapter",
            {"reduction_factor": 4, "low_rank_rank": 1},
            [r"[r](encoder|decoder)\.block\.\d+\.layer\.0", r"[r]encoder\.block\.\d+\.layer\.1", "layer.2"],
        ),
        # OpenDelta's "ff" on BERT is both feed-forward sub-layers (its real BitFit checkpoints hold
        # intermediate.dense.bias: tests/test_opendelta_fixtures.py)
        ("bert", "adapter", {"bottleneck_dim": 4}, ["attention", r"[r]layer\.\d+\.(intermediate|output)"]),
    ],
)
def test_opendelta_checkpoints_with_default_positions_load_where_opendelta_put_them(
    family, delta_type, options, positions, tmp_path
):
    reference = build(family)
    delta = AutoDeltaModel.from_config({"delta_type": delta_type, **options, "modified_modules": positions}, reference)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_(std=0.1)
    state = {k: p.detach().clone() for k, p in delta.named_delta_tensors()}
    config = {"delta_type": delta_type, **options, "modified_modules": ["attn", "ff"], "common_structure": True}
    _opendelta_checkpoint(tmp_path / "od", config, state)
    fresh = build(family)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "od", fresh)
    assert sorted(k for k, _ in loaded.named_delta_tensors()) == sorted(state)
    inputs = batch(family)
    assert torch.equal(logits(fresh, inputs), logits(reference, inputs))


def test_opendelta_soft_prompt_checkpoint_loads(tmp_path):
    from opendelta_dist import SoftPromptModel

    reference = build("t5")
    delta = SoftPromptModel(reference, soft_token_num=4)
    ((_, embeds),) = delta.named_delta_tensors()
    with torch.no_grad():
        embeds.normal_()
    config = {"delta_type": "soft_prompt", "soft_token_num": 4, "init_range": 0.5, "token_init": True}
    state = {"encoder.soft_prompt_layer.soft_embeds": embeds.detach().clone()}  # OpenDelta's name
    _opendelta_checkpoint(tmp_path / "od", {**config, "modified_modules": ["root"], "common_structure": False}, state)
    fresh = build("t5")
    with pytest.warns(UserWarning, match="opendelta_compat=True"):  # placed as OpenDelta placed it
        AutoDeltaModel.from_finetuned(tmp_path / "od", fresh)
    inputs = batch("t5")  # no left padding: both placements agree
    assert torch.equal(logits(fresh, inputs), logits(reference, inputs))


def test_opendelta_prefix_checkpoint_loads_and_a_broken_reparameterised_one_is_refused(tmp_path):
    from opendelta_dist import PrefixModel

    reference = build("gpt2")
    delta = PrefixModel(reference, prefix_token_num=3, reparameterize=False)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_()
    # OpenDelta keeps each layer's prefix as (tokens, heads x head size) under past_key / past_value
    state = {
        k.replace(".prefix.key", ".prefix.past_key").replace(".prefix.value", ".prefix.past_value"): (
            p.detach().transpose(0, 1).reshape(p.shape[1], -1).clone()
        )
        for k, p in delta.named_delta_tensors()
    }
    config = {"delta_type": "prefix", "prefix_token_num": 3, "reparameterize": False, "embed_dim": 512, "mid_dim": 512}
    _opendelta_checkpoint(tmp_path / "od", {**config, "modified_modules": ["attn"], "common_structure": True}, state)
    fresh = build("gpt2")
    AutoDeltaModel.from_finetuned(tmp_path / "od", fresh)
    inputs = batch("gpt2")
    assert torch.equal(logits(fresh, inputs), logits(reference, inputs))

    # a reparameterised checkpoint is evaluated into plain prefixes (tests/test_opendelta_fixtures.py has real
    # ones); one whose network is incomplete is refused and leaves the backbone as it was
    reparameterised = {**state, "transformer.h.0.attn.reparams.control_trans.0.weight": torch.zeros(2, 2)}
    _opendelta_checkpoint(tmp_path / "od2", {**config, "reparameterize": True}, reparameterised)
    other = build("gpt2")
    with pytest.raises(DeltaCheckpointError, match="reparameterisation network this library cannot read"):
        AutoDeltaModel.from_finetuned(tmp_path / "od2", other)
    assert torch.equal(logits(other, inputs), logits(build("gpt2"), inputs))


def test_a_delta_with_its_own_task_head_loads_onto_a_differently_initialised_head(tmp_path):
    model = build("bert")
    delta = LoraModel(model, unfrozen_modules=["deltas", "classifier"])
    with torch.no_grad():
        model.classifier.weight.normal_()
    inputs = batch("bert")
    tuned = logits(model, inputs)
    delta.save_finetuned(tmp_path / "d")
    fresh = build("bert")
    with torch.no_grad():
        fresh.classifier.weight.normal_()  # another random head: the delta brings its own
    AutoDeltaModel.from_finetuned(tmp_path / "d", fresh)
    assert torch.equal(logits(fresh, inputs), tuned)
    other = build("bert", seed=3)  # but other backbone weights are still refused
    with pytest.raises(BackboneMismatchError):
        AutoDeltaModel.from_finetuned(tmp_path / "d", other)


def test_saved_files_get_the_permissions_of_any_new_file(tmp_path):
    """The atomic writes (a private temporary file, renamed) leave files readable as the umask says, so a
    teammate on a shared file system can load the delta."""
    import os
    import stat

    from opendelta_dist import LoraModel
    from tests.models import build

    umask = os.umask(0o022)
    try:
        delta = LoraModel(build("t5"))
        delta.save_finetuned(tmp_path / "delta")
    finally:
        os.umask(umask)
    for file in (tmp_path / "delta").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_loading_a_delta_onto_a_backbone_that_carries_one_of_its_kind_warns(tmp_path):
    """Loading a checkpoint twice onto one backbone stacks two copies (several deltas on a module are allowed):
    it says so, and how to avoid it."""
    import warnings

    from opendelta_dist import AutoDeltaModel, LoraModel
    from tests.models import build

    LoraModel(build("t5")).save_finetuned(tmp_path / "delta")
    model = build("t5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoDeltaModel.from_finetuned(tmp_path / "delta", model)  # the first one: no warning
    with pytest.warns(UserWarning, match=r"carries a lora delta on '.*q' and \d+ more modules already.*detach"):
        AutoDeltaModel.from_finetuned(tmp_path / "delta", model)
