"""Shards are standard tars webdataset reads; the manifest and --verify catch corruption."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data_sharding import shards
from data_sharding.errors import ShardError
from launch.cli import main


def test_shards_are_tars_that_tarfile_numpy_and_webdataset_read(dataset):
    manifest = shards.load_manifest(dataset)
    first = manifest["generations"][0]["shards"][0]
    path = dataset / first["name"]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        arrays = [np.load(io.BytesIO(tar.extractfile(m).read())) for m in members]
    assert len(members) == first["users"]
    assert sum(len(a) for a in arrays) == first["events"]
    assert all(m.name.endswith(".seq.npy") and m.mtime == 0 for m in members)
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [m.name[: -len(".seq.npy")] for m in members]
    assert all((s["seq.npy"] == a).all() for s, a in zip(samples, arrays, strict=True))
    assert samples[0]["seq.npy"].dtype == shards.SEQ_DTYPE


def test_manifest_records_counts_checksums_vocab_and_sources(dataset):
    manifest = shards.load_manifest(dataset)
    gen = manifest["generations"][0]
    assert manifest["schema_version"] == shards.SCHEMA_VERSION
    assert manifest["vocab"]["version"].startswith("g0001-")
    assert sum(s["events"] for s in gen["shards"]) == manifest["totals"]["events"] == 30_000
    assert gen["sources"][0]["sha256"] and gen["sources"][0]["bytes"] > 0
    assert gen["options"]["events_per_shard"] == 4_000
    assert gen["quarantine"]["bad_rows"] == 0
    for s in gen["shards"]:
        assert shards.sha256_file(dataset / s["name"]) == s["sha256"]
    index = np.load(dataset / gen["shards"][0]["index"])
    assert index["n_events"].sum() == gen["shards"][0]["events"]


def test_verify_names_a_corrupt_and_a_missing_shard(tmp_path, dataset, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    assert main(["inspect", str(copy), "--verify"]) == 0
    manifest = shards.load_manifest(copy)
    corrupt, missing = (s["name"] for s in manifest["generations"][0]["shards"][:2])
    with open(copy / corrupt, "r+b") as f:
        f.seek(2000)
        f.write(b"\x00\x01\x02")
    (copy / missing).unlink()
    assert main(["inspect", str(copy), "--verify"]) == 1
    err = capsys.readouterr().err
    assert f"{corrupt}: sha256 mismatch" in err
    assert f"{missing}: missing" in err


def test_a_manifest_from_another_schema_version_is_refused(tmp_path, dataset):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    text = (copy / "manifest.json").read_text().replace('"schema_version": 1', '"schema_version": 99')
    (copy / "manifest.json").write_text(text)
    with pytest.raises(ShardError, match="schema version 99"):
        shards.load_manifest(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: None, "a JSON null, not an object"),
        (lambda m: [], "a JSON array, not an object"),
        (lambda m: "manifest", "a JSON string, not an object"),
        (lambda m: {**m, "schema_version": "1"}, "schema version '1'"),
        (lambda m: {**m, "generations": "g0001"}, "'generations' is string, expected array"),
        (lambda m: {k: v for k, v in m.items() if k != "vocab"}, "'vocab' is null, expected object"),
        (lambda m: {**m, "generations": [1]}, r"generations\[0\] lacks its number or shard list"),
        (lambda m: {**m, "generations": []}, "no generations"),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_file(tmp_path, dataset, capsys, edit, message):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(ShardError, match=message) as err:
        shards.load_manifest(copy)
    assert str(copy / "manifest.json") in str(err.value) and "\n" not in str(err.value)
    assert main(["inspect", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message.replace("\\", "") in err.replace("\\", "")


def test_tar_headers_match_pythons_tarfile_for_long_and_short_sequences():
    records = np.zeros(1 + 300, dtype=shards.SEQ_DTYPE)
    records["item"] = np.arange(len(records))
    data, offsets = shards.build_shard(records, np.array([0, 9_999_999_999 % 2**31]), np.array([1, 300]))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        sizes = [m.size for m in tar.getmembers()]
    assert sizes == [shards.NPY_HEADER_SIZE + n * shards.SEQ_DTYPE.itemsize for n in (1, 300)]
    uidx, events = shards.read_sample(data, int(offsets[1]), "t")
    assert events["item"].tolist() == list(range(1, 301))
