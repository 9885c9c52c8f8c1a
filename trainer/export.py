"""Self-contained model exports, and loading a model for inference from a run or an export.

An export directory holds::

    export.json            format, version, source run/step, vocab version, event types, heads
    backbone/              the backbone as a Hugging Face model (config.json + model.safetensors):
                           LoRA merged when --merge-lora; `AutoModel.from_pretrained` loads it
    adapter.safetensors    LoRA weights kept apart (only without --merge-lora)
    behavior.safetensors   item table (text/attributes folded in), event-type and time-gap
                           embeddings, the time bias, next-type/time/value heads, and what places new items
                           (trainer.new_items: text projection, attribute embeddings)
    items.parquet          item id and title per model id (row i is id i)

``--quantize int8`` is recorded in export.json and applied when the export is loaded (dynamic
quantization of the backbone's linear layers): the stored weights stay fp32, so the same export
can be served both ways.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_sharding import shards
from trainer import checkpoint as ckpt
from trainer.config import CONFIG
from trainer.errors import ConfigError
from trainer.folding import merge_lora, strip_lora
from trainer.inference import InferenceModel
from trainer.new_items import ItemWriter
from trainer.priors import PAIRS_FILE, RepeatPrior, TransitionPrior, load_pairs
from trainer.trend_prior import EVENTS_FILE, TrendPrior, load_events, save_events

EXPORT_FORMAT = 1
EXPORT_META = "export.json"
QUANTIZE = ("int8",)


def _unload_lora(module: nn.Module) -> dict[str, torch.Tensor]:
    """Remove LoRA layers without merging them; returns their weights (keys relative to ``module``)."""
    adapter = {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k}
    strip_lora(module, merge=False)
    return adapter


def _check_quantize(quantize: str | None) -> None:
    if quantize not in (None, *QUANTIZE):
        raise ConfigError(f"--quantize {quantize!r}: choose {', '.join(QUANTIZE)}")


def _load_trained(run: Path, log=print):
    """(training model, config, dataset info, weights folder, event type names, version) of a run;
    the weights folder is chosen and checksummed once."""
    from trainer.run import load_run_model, weights_source

    source = weights_source(run, "best", log)
    model, cfg, info = load_run_model(run, log=log, source=source)
    event_types = shards.load_manifest(cfg.data.path)["vocab"]["event_types"]
    version = f"{run.resolve().name}@{source.name}:step-{ckpt.read_state(source)['step']}"
    return model, cfg, info, source, event_types, version


def load_run(run: Path, log=print) -> InferenceModel:
    """A trained run's best (else latest valid) weights in inference form."""
    model, _, info, _, event_types, version = _load_trained(run, log)
    return InferenceModel.from_model(model, info, event_types, version)


def source_signature(path: Path) -> str | None:
    """Changes whenever the weights a run or export would load change (for hot reload): cheap
    (file metadata only; checksums are verified when the weights are loaded). None when nothing
    loadable is there yet."""
    meta = path / EXPORT_META
    if meta.exists():
        stat = meta.stat()
        return f"export:{stat.st_mtime_ns}:{stat.st_ino}"
    for candidate in [path / "best", *reversed(ckpt.checkpoints(path))]:
        done = candidate / ckpt.META  # written last: a folder without it is still being written
        if done.exists():
            stat = done.stat()
            return f"run:{candidate.name}:{stat.st_mtime_ns}:{stat.st_ino}"
    return None


def load_inference(path: Path, quantize: str | None = None, log=print) -> InferenceModel:
    """An export directory or a run folder -> InferenceModel (int8 when asked or when exported so)."""
    path = Path(path)
    if (path / EXPORT_META).exists():
        model = load_export(path)
    elif (path / CONFIG).exists():
        model = load_run(path, log)
    else:
        raise ConfigError(f"{path}: neither a run folder (config.yaml) nor an export ({EXPORT_META})")
    _check_quantize(quantize)
    if quantize and not model.quantized:
        model.quantize()
    return model


def export_run(run: Path, out: Path, merge: bool = True, quantize: str | None = None, overwrite: bool = False) -> dict:
    """Write the export of ``run`` to ``out`` atomically (assembled beside it, then renamed)."""
    _check_quantize(quantize)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose a new --out or pass --overwrite")
    model, cfg, info, source, event_types, version = _load_trained(run)
    inference = InferenceModel.from_model(copy.deepcopy(model) if not merge else model, info, event_types, version)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = None
    if merge:
        backbone = inference.backbone
    else:
        backbone = model.backbone  # still holds its LoRA layers
        adapter = _unload_lora(backbone)
        if adapter:
            save_file(adapter, str(tmp / "adapter.safetensors"))
            lora = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": sorted(_lora_targets(adapter))}
    backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
    weights, new_items = _behavior_weights(inference)
    if inference.prior is not None:
        shutil.copyfile(run / PAIRS_FILE, tmp / PAIRS_FILE)
    if inference.trend is not None:  # the run's events: a served model counts the posted ones on top
        save_events(tmp / EVENTS_FILE, dict(zip(("item", "ts"), inference.trend.base, strict=True)))
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "behavior.safetensors"))
    pq.write_table(pa.table({"item": inference.items, "title": inference.titles}), tmp / "items.parquet")
    meta = {
        "format": EXPORT_FORMAT,
        "version": inference.version,
        "source_run": str(run.resolve()),
        "source_weights": str(source.resolve()),
        "vocab_version": info.vocab_version,
        "event_types": inference.event_types,
        "max_len": inference.max_len,
        "heads": sorted(inference.heads),
        "merged_lora": merge or lora is None,
        "lora": lora,
        "quantize": quantize,
        "new_items": new_items,
        "trend_windows_days": inference.trend.windows_days if inference.trend is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(tmp / EXPORT_META, "w") as f:  # written last: an export without it is incomplete
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def _behavior_weights(inference: InferenceModel) -> tuple[dict[str, torch.Tensor], dict | None]:
    """behavior.safetensors' tensors of a model in inference form, and the JSON metadata of what
    places new items (trainer.new_items; None when the model cannot)."""
    weights = {"item_table": inference.item_table, "types": inference.types.weight, "gaps": inference.gaps.weight}
    if inference.query_gaps is not None:
        weights["query_gaps"] = inference.query_gaps.weight
    if inference.time_bias is not None:
        weights["time_bias"] = inference.time_bias
    if inference.repeat is not None:
        weights["repeat_weight"] = inference.repeat.weight.reshape(1)
    if inference.trend is not None:
        weights["trend_weight"] = inference.trend.weight
    if inference.prior is not None:
        weights["prior_weight"] = inference.prior.weight
        if inference.prior.gate is not None:
            weights["prior_gate.weight"] = inference.prior.gate.weight
            weights["prior_gate.bias"] = inference.prior.gate.bias
    new_items = None
    if inference.writer is not None:
        writer_tensors, new_items = inference.writer.state()
        weights.update(writer_tensors)
    for name, head in inference.heads.items():
        weights[f"{name}_head.weight"] = head.weight
        weights[f"{name}_head.bias"] = head.bias
    return weights, new_items


def _lora_targets(adapter: dict[str, torch.Tensor]) -> set[str]:
    # keys look like layers.0.self_attn.q_proj.lora_A.default.weight
    return {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in adapter}


def load_export(path: Path) -> InferenceModel:
    """An export directory -> InferenceModel (LoRA merged at load when it was kept apart)."""
    from transformers import AutoModel

    meta_path = path / EXPORT_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{meta_path}: unreadable export metadata ({e})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}: export format {meta.get('format')} (this version reads {EXPORT_FORMAT})")
    try:
        backbone = AutoModel.from_pretrained(path / "backbone", dtype=torch.float32)
        weights = load_file(str(path / "behavior.safetensors"))
        items = pq.read_table(path / "items.parquet")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: incomplete or corrupt export ({e})") from None
    if meta.get("lora"):
        backbone = _merged_adapter(path, backbone, meta["lora"])
    types = nn.Embedding.from_pretrained(weights["types"], freeze=True)
    gaps = nn.Embedding.from_pretrained(weights["gaps"], freeze=True)
    heads = _heads(weights, meta["heads"])
    query_gaps = nn.Embedding.from_pretrained(weights["query_gaps"], freeze=True) if "query_gaps" in weights else None
    prior, repeat = _priors(path, weights)
    trend = _trend(path, weights, meta.get("trend_windows_days"))
    model = InferenceModel(
        backbone,
        weights["item_table"],
        types,
        gaps,
        heads,
        items["item"].to_pylist(),
        items["title"].to_pylist(),
        meta["event_types"],
        meta["max_len"],
        meta["version"],
        query_gaps,
        prior,
        repeat,
        ItemWriter.from_state(weights, meta.get("new_items")),
        trend,
        weights.get("time_bias"),
    )
    if meta.get("quantize") == "int8":
        model.quantize()
    return model


def _merged_adapter(path: Path, backbone: nn.Module, lora: dict) -> nn.Module:
    """The export's separate LoRA adapter, loaded into ``backbone`` and merged."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"])
    backbone = inject_adapter_in_model(config, backbone)
    missing = backbone.load_state_dict(load_file(str(path / "adapter.safetensors")), strict=False)
    if missing.unexpected_keys:
        raise ConfigError(f"{path}/adapter.safetensors does not fit the backbone: {missing.unexpected_keys[:3]}")
    merge_lora(backbone)
    return backbone


def _heads(weights: dict[str, torch.Tensor], names: list[str]) -> dict[str, nn.Linear]:
    heads = {}
    for name in names:
        weight, bias = weights[f"{name}_head.weight"], weights[f"{name}_head.bias"]
        head = nn.Linear(weight.shape[1], weight.shape[0])
        head.load_state_dict({"weight": weight, "bias": bias})
        heads[name] = head
    return heads


def _priors(path: Path, weights: dict[str, torch.Tensor]) -> tuple[TransitionPrior | None, RepeatPrior | None]:
    """The transition prior (its pair counts are a file of the export) and the repeat prior, when trained."""
    prior = None
    if "prior_weight" in weights:
        try:
            gate = weights["prior_gate.weight"].shape[1] if "prior_gate.weight" in weights else 0
            prior = TransitionPrior(load_pairs(path / PAIRS_FILE), len(weights["item_table"]), gate)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path}/{PAIRS_FILE}: missing or corrupt transition counts ({e})") from None
        prior.weight.data.copy_(weights["prior_weight"])
        if prior.gate is not None:
            prior.gate.weight.data.copy_(weights["prior_gate.weight"])
            prior.gate.bias.data.copy_(weights["prior_gate.bias"])
    repeat = None
    if "repeat_weight" in weights:
        repeat = RepeatPrior(len(weights["item_table"]))
        repeat.weight.data.copy_(weights["repeat_weight"][0])
    return prior, repeat


def _trend(path: Path, weights: dict[str, torch.Tensor], windows_days: list[float] | None) -> TrendPrior | None:
    """The trend prior, when trained (the run's events are a file of the export)."""
    if "trend_weight" not in weights:
        return None
    if not windows_days:
        raise ConfigError(f"{path}/{EXPORT_META}: a trend prior without its trend_windows_days")
    try:
        trend = TrendPrior(load_events(path / EVENTS_FILE), len(weights["item_table"]), windows_days)
        trend.weight.data.copy_(weights["trend_weight"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"{path}/{EVENTS_FILE}: missing or corrupt trend prior events ({e})") from None
    return trend
