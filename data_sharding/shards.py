"""Webdataset tar shards, their per-shard index, and the dataset manifest.

A shard is a plain POSIX (ustar) tar, readable by ``tar``, Python's ``tarfile`` and
``webdataset``. Each user is one sample, one member ``<uidx:010d>.seq.npy``: a structured numpy
array (``SEQ_DTYPE``) of that user's events in time order. Packing all fields of a user into one
member keeps the tar overhead at one 512-byte header per user instead of one per field.

Writing is vectorised: tar and npy headers for all users of a shard are built as numpy byte
matrices and the shard is assembled in one buffer, so the cost per user is a slice copy, not a
``tarfile`` call. Members have mtime 0, uid/gid 0 and mode 0644, so the same input gives
byte-identical shards.

Beside each tar, ``<shard>.idx.npy`` (``INDEX_DTYPE``) lists, per sample, the user index, byte
offset and event counts per split. The streaming loader uses it to balance ranks exactly and to
resume mid-epoch without decoding what it skips.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_sharding.errors import ShardError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SEQ_DTYPE = np.dtype(
    [("item", "<i4"), ("ts", "<i8"), ("type", "<i2"), ("value", "<f4"), ("split", "i1"), ("new", "i1")]
)
"""One event: item id, timestamp (int64 ms), event type id, value (NaN if none), split, new-in-generation."""
SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
SPLIT_NAMES = {"train": SPLIT_TRAIN, "valid": SPLIT_VALID, "test": SPLIT_TEST}
INDEX_DTYPE = np.dtype(
    [
        ("uidx", "<i4"),
        ("offset", "<i8"),
        ("n_events", "<i4"),
        ("n_train", "<i4"),
        ("n_valid", "<i4"),
        ("n_new", "<i4"),
    ]
)
"""Per sample: user index, byte offset of its tar header, events in total / in train / in valid / new."""
MEMBER_SUFFIX = ".seq.npy"
KEY_WIDTH = 10
_BLOCK = 512
_SHAPE_WIDTH = 12


def _npy_header_template() -> bytes:
    descr = str(SEQ_DTYPE.descr).replace('"', "'")
    body = f"{{'descr': {descr}, 'fortran_order': False, 'shape': ({'#' * _SHAPE_WIDTH},), }}"
    total = -(-(10 + len(body) + 1) // 64) * 64
    body = body + " " * (total - 10 - len(body) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + (total - 10).to_bytes(2, "little") + body.encode("latin-1")


NPY_HEADER = _npy_header_template()
NPY_HEADER_SIZE = len(NPY_HEADER)
_SHAPE_AT = NPY_HEADER.index(b"#" * _SHAPE_WIDTH)


def _octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) ASCII octal digits of non-negative ints, zero padded."""
    shifts = 3 * np.arange(width - 1, -1, -1, dtype=np.int64)
    return (((values[:, None] >> shifts) & 7) + ord("0")).astype(np.uint8)


def _decimal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) ASCII decimal digits of non-negative ints, right-aligned, padded with spaces."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = (values[:, None] // powers) % 10
    leading = values[:, None] < powers
    leading[:, -1] = False
    return np.where(leading, ord(" "), digits + ord("0")).astype(np.uint8)


def _tar_headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(n, 512) ustar headers for regular files with the given (n, k) ASCII names and sizes."""
    template = np.zeros(_BLOCK, dtype=np.uint8)
    for offset, text in (
        (100, b"0000644\0"),
        (108, b"0000000\0"),
        (116, b"0000000\0"),
        (136, b"00000000000\0"),
    ):
        template[offset : offset + len(text)] = np.frombuffer(text, np.uint8)
    template[156] = ord("0")
    template[257:265] = np.frombuffer(b"ustar\x0000", np.uint8)
    template[329:345] = np.frombuffer(b"0000000\x000000000\x00", np.uint8)
    template[148:156] = ord(" ")
    headers = np.tile(template, (len(sizes), 1))
    headers[:, : names.shape[1]] = names
    headers[:, 124:135] = _octal_digits(sizes, 11)
    checksum = headers.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = _octal_digits(checksum, 6)
    headers[:, 154] = 0
    return headers


def member_names(uidx: np.ndarray) -> np.ndarray:
    """(n, k) ASCII bytes of ``<uidx:010d>.seq.npy``."""
    digits = ((uidx[:, None].astype(np.int64) // 10 ** np.arange(KEY_WIDTH - 1, -1, -1)) % 10 + ord("0")).astype(
        np.uint8
    )
    suffix = np.tile(np.frombuffer(MEMBER_SUFFIX.encode(), np.uint8), (len(uidx), 1))
    return np.concatenate([digits, suffix], axis=1)


def build_shard(records: np.ndarray, uidx: np.ndarray, lengths: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Tar bytes for users ``uidx`` whose events are consecutive runs of ``lengths`` in ``records``.

    Returns (tar bytes, sample offsets).
    """
    assert records.dtype == SEQ_DTYPE and len(uidx) == len(lengths)
    data_sizes = NPY_HEADER_SIZE + lengths.astype(np.int64) * SEQ_DTYPE.itemsize
    member_sizes = _BLOCK + -(-data_sizes // _BLOCK) * _BLOCK
    offsets = np.concatenate([[0], np.cumsum(member_sizes)]).astype(np.int64)
    total = int(offsets[-1]) + 2 * _BLOCK  # end-of-archive marker: two zero blocks
    out = np.zeros(total, dtype=np.uint8)
    blocks = out.reshape(-1, _BLOCK)
    first_block = offsets[:-1] // _BLOCK
    blocks[first_block] = _tar_headers(member_names(uidx), data_sizes)
    npy = np.tile(np.frombuffer(NPY_HEADER, np.uint8), (len(uidx), 1))
    npy[:, _SHAPE_AT : _SHAPE_AT + _SHAPE_WIDTH] = _decimal_digits(lengths.astype(np.int64), _SHAPE_WIDTH)
    blocks[first_block + 1, :NPY_HEADER_SIZE] = npy
    raw = records.view(np.uint8)
    starts = (np.concatenate([[0], np.cumsum(lengths)])[:-1] * SEQ_DTYPE.itemsize).astype(np.int64)
    ends = starts + lengths.astype(np.int64) * SEQ_DTYPE.itemsize
    data_at = offsets[:-1] + _BLOCK + NPY_HEADER_SIZE
    for dst, a, b in zip(data_at.tolist(), starts.tolist(), ends.tolist(), strict=True):
        out[dst : dst + b - a] = raw[a:b]
    return out.tobytes(), offsets[:-1]


def read_sample(buf: memoryview | bytes, offset: int, shard: str) -> tuple[int, np.ndarray]:
    """(uidx, events) of the sample whose tar header starts at ``offset`` in shard bytes ``buf``."""
    header = bytes(buf[offset : offset + _BLOCK])
    if len(header) < _BLOCK or header[257:262] != b"ustar":
        raise ShardError(f"shard {shard}: no tar header at byte {offset} (truncated or corrupt)")
    name = header[:100].rstrip(b"\0").decode("ascii", "replace")
    if not name.endswith(MEMBER_SUFFIX):
        raise ShardError(f"shard {shard}: unexpected member {name!r} at byte {offset}")
    at = offset + _BLOCK
    if bytes(buf[at : at + 6]) != b"\x93NUMPY":
        raise ShardError(f"shard {shard}: member {name} is not a numpy array (corrupt)")
    size = int(header[124:135], 8)
    count = (size - NPY_HEADER_SIZE) // SEQ_DTYPE.itemsize
    if at + size > len(buf):
        raise ShardError(f"shard {shard}: member {name} runs past the end of the file (truncated)")
    events = np.frombuffer(buf, dtype=SEQ_DTYPE, count=count, offset=at + NPY_HEADER_SIZE)
    return int(name[:KEY_WIDTH]), events


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def index_bytes(index: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ShardInfo:
    """A shard as listed in the manifest (paths relative to the dataset root)."""

    name: str
    index: str
    sha256: str
    index_sha256: str
    bytes: int
    users: int
    events: int
    generation: int

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def generation_entry(
    *,
    generation: int,
    gen_dir: str,
    seconds: float,
    phase_seconds: dict[str, float],
    sources: list[dict],
    options: dict,
    vocab_version: str,
    quarantine: dict,
    counts: dict,
    shard_list: list[ShardInfo],
) -> dict:
    """One generation's record in the manifest: what built it, where its files are, what it holds."""
    return {
        "generation": generation,
        "dir": gen_dir,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": seconds,
        "phase_seconds": phase_seconds,
        "sources": sources,
        "options": options,
        "vocab_version": vocab_version,
        "events_log": f"{gen_dir}/events/*.parquet",
        "quarantine": {**quarantine, "file": f"{gen_dir}/quarantine.jsonl"},
        "counts": counts,
        "shards": [s.to_dict() for s in shard_list],
    }


def build_manifest(previous: dict | None, entry: dict, split: dict, vocab: dict, users_events: tuple[int, int]) -> dict:
    """The dataset manifest once generation ``entry`` is added to manifest ``previous`` (None: the first).

    ``vocab`` describes the newest vocabulary; ``users_events`` counts the users with events and
    their events in the newest state of the dataset.
    """
    generations = (previous["generations"] if previous else []) + [entry]
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "behavior-gpt/webdataset",
        "generation": entry["generation"],
        "time_unit": "ms",
        "record_dtype": [list(d) for d in SEQ_DTYPE.descr],
        "index_dtype": [list(d) for d in INDEX_DTYPE.descr],
        "split": split,
        "vocab": vocab,
        "totals": {
            "users": int(users_events[0]),
            "events": int(users_events[1]),
            "shards": sum(len(g["shards"]) for g in generations),
            "bytes": sum(s["bytes"] for g in generations for s in g["shards"]),
        },
        "generations": generations,
    }


def load_manifest(root: Path | str) -> dict:
    """Read ``root/manifest.json`` (a folder or an fsspec URL); clear errors for a missing, corrupt
    or newer-schema manifest."""
    from data_sharding import storage

    path = storage.join(root, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(root, MANIFEST))
    except FileNotFoundError:
        raise ShardError(f"{root}: no {MANIFEST}; not a dataset written by `bgpt shard`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: corrupt manifest (a JSON {_json_kind(manifest)}, not an object)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema version {version!r}, this bgpt reads version {SCHEMA_VERSION}; "
            f"re-shard the data with this version of bgpt"
        )
    for key, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise ShardError(
                f"{path}: corrupt manifest ({key!r} is {_json_kind(manifest.get(key))}, expected {_json_kind(kind())})"
            )
    for n, gen in enumerate(manifest["generations"]):
        if (
            not isinstance(gen, dict)
            or not isinstance(gen.get("generation"), int)
            or not isinstance(gen.get("shards"), list)
        ):
            raise ShardError(f"{path}: corrupt manifest (generations[{n}] lacks its number or shard list)")
    if not manifest["generations"]:
        raise ShardError(f"{path}: corrupt manifest (no generations)")
    return manifest


_MANIFEST_FIELDS = {
    "generation": int,
    "time_unit": str,
    "record_dtype": list,
    "index_dtype": list,
    "split": dict,
    "vocab": dict,
    "totals": dict,
    "generations": list,
}


def _json_kind(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def manifest_shards(manifest: dict, generations: str | int = "latest") -> list[ShardInfo]:
    """Shards of one generation (an int), of the newest one ("latest"), or of every generation ("all")."""
    gens = manifest["generations"]
    if generations == "latest":
        gens = gens[-1:]
    elif generations != "all":
        gens = [g for g in gens if g["generation"] == int(generations)]
        if not gens:
            raise ShardError(f"no generation {generations} in the manifest")
    return [ShardInfo(**s) for g in gens for s in g["shards"]]


def verify_dataset(root: Path, manifest: dict) -> list[str]:
    """Re-hash every shard and index of every generation; return one problem line per bad file."""
    problems = []
    for shard in manifest_shards(manifest, "all"):
        for rel, expected, size in (
            (shard.name, shard.sha256, shard.bytes),
            (shard.index, shard.index_sha256, None),
        ):
            path = Path(root) / rel
            if not path.exists():
                problems.append(f"{rel}: missing")
            elif size is not None and path.stat().st_size != size:
                problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {size} (truncated?)")
            elif sha256_file(path) != expected:
                problems.append(f"{rel}: sha256 mismatch (corrupt)")
    return problems
