"""Folding a trained backbone for inference: LoRA merged into (or dropped from) the base weights,
GPT-2's Conv1D turned into Linear, dynamic int8 quantization."""

from __future__ import annotations

import torch
from torch import nn


def strip_lora(module: nn.Module, merge: bool = True) -> nn.Module:
    """Put every peft LoRA layer's plain base layer back in its place, after folding the adapter
    into the base weight (``merge``) or dropping it."""
    for name, child in list(module.named_children()):
        if hasattr(child, "merge") and hasattr(child, "get_base_layer"):
            if merge:
                child.merge()
            setattr(module, name, child.get_base_layer())
        else:
            strip_lora(child, merge)
    return module


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer into its base weight and put the plain layer back in its place."""
    return strip_lora(module, merge=True)


def conv1d_to_linear(module: nn.Module) -> nn.Module:
    """GPT-2's ``Conv1D`` (weight stored in x out) -> ``nn.Linear``, so dynamic quantization sees it."""
    for name, child in list(module.named_children()):
        if type(child).__name__ == "Conv1D":
            weight = child.weight.detach()
            linear = nn.Linear(weight.shape[0], weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                linear.bias.copy_(child.bias.detach())
            setattr(module, name, linear)
        else:
            conv1d_to_linear(child)
    return module


def quantize_int8(backbone: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the backbone's linear layers (weights int8, activations
    quantized on the fly); embeddings, norms and the item table stay fp32."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(conv1d_to_linear(backbone), {nn.Linear}, dtype=torch.qint8)
