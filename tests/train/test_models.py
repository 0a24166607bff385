import pytest
import torch

from opendelta_dist import LoraModel
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.models import ModelConfig, build_model

TINY_T5 = {
    "model_type": "t5",
    "vocab_size": 99,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def test_random_model_from_config_in_bf16():
    model = build_model(ModelConfig(config=TINY_T5, dtype="bf16"))
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert model.dtype == torch.bfloat16


def test_classification_head_and_meta_device():
    cfg = {
        "model_type": "bert",
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
    }
    model = build_model(ModelConfig(config=cfg, task="classification", num_labels=3, init_device="meta"))
    assert model.classifier.out_features == 3
    assert all(p.device.type == "meta" for p in model.parameters())


def test_gradient_checkpointing_keeps_gradients_flowing_to_deltas_on_frozen_embeddings():
    model = build_model(ModelConfig(config=TINY_T5, gradient_checkpointing=True))
    delta = LoraModel(model)
    delta.freeze_module()
    assert not model.shared.weight.requires_grad
    model.train()
    ids = torch.randint(3, 99, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for _, p in delta.named_delta_tensors() if p.shape[0] != 8]  # lora_B (out, r) starts at zero
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_model_configs():
    with pytest.raises(DeltaConfigError, match="model_type"):
        build_model(ModelConfig(config={"d_model": 8}))
    with pytest.raises(DeltaConfigError, match="name_or_path"):
        build_model(ModelConfig())
    with pytest.raises(DeltaConfigError, match="dtype"):
        build_model(ModelConfig(config=TINY_T5, dtype="fp8"))
    with pytest.raises(DeltaConfigError, match="task"):
        build_model(ModelConfig(config=TINY_T5, task="ranking"))
