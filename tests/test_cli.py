"""The bgpt command line: subcommands run end to end; bad input is one line on stderr, exit 2."""

import json

from launch.cli import main


def test_synth_shard_inspect_round_trip(tmp_path, capsys):
    raw = tmp_path / "raw" / "events.csv"
    assert main(["synth", "--events", "3000", "--users", "60", "--items", "80", "--out", str(raw)]) == 0
    assert (tmp_path / "raw" / "items.csv").exists()
    out = tmp_path / "data"
    args = ["shard", "--input", str(raw), "--items", str(tmp_path / "raw" / "items.csv"), "--out", str(out)]
    assert main([*args, "--events-per-shard", "1000"]) == 0
    assert "generation 1 written" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json", "--verify"]) == 0
    text = capsys.readouterr().out
    info = json.loads(text[: text.rindex("}") + 1])
    assert info["events"] == 3000 and info["users"] == 60
    assert info["event_types"] == ["view", "click", "cart", "purchase"]
    assert len(info["generations"]) == 1 and info["generations"][0]["shards"] == 3


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["shard", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bgpt: error: ") and "nope.csv: no such file" in err and "\n" not in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a dataset written by `bgpt shard`" in capsys.readouterr().err
    assert main(["shard", "--input", "x.csv", "--out", str(tmp_path / "o"), "--split", "weekly"]) == 2
    assert "unknown --split 'weekly'" in capsys.readouterr().err
