"""The bgpt command line: subcommands run end to end; bad input is one line on stderr, exit 2."""

import json

import pytest

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


def test_slurm_render_fills_the_templates_sbatch_header_from_its_own_defaults(tmp_path, capsys, dataset):
    from launch.cluster_cli import SLURM_TEMPLATE

    run = tmp_path / "run"
    assert main(["slurm", "render", "--", "--data", str(dataset), "--out", str(run)]) == 0
    script = run / "launch" / "train.sbatch"
    rendered = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    template = [line for line in SLURM_TEMPLATE.read_text().splitlines() if line.startswith("#SBATCH")]
    expected = [f"#SBATCH --output={run.resolve() / 'slurm-%j.out'}" if "--output=" in t else t for t in template]
    assert rendered == expected  # without options, the template's values (one source of the defaults)
    assert main(["slurm", "render", "--nodes", "3", "--time", "1:00:00", "--signal-seconds", "90",
                 "--partition", "gpu", "--gpus-per-node", "8", "--", "--data", str(dataset), "--out", str(run)]) == 0  # fmt: skip
    header = {line.split("=")[0]: line.split("=", 1)[1] for line in script.read_text().splitlines() if "=" in line and line.startswith("#SBATCH")}  # fmt: skip
    assert header["#SBATCH --nodes"] == "3" and header["#SBATCH --time"] == "1:00:00"
    assert header["#SBATCH --signal"] == "B:USR1@90" and header["#SBATCH --partition"] == "gpu"
    assert header["#SBATCH --gpus-per-node"] == "8"
    assert "#SBATCH --requeue" in script.read_text()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}, "8"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4"),
        ({}, "1"),  # a CPU-only allocation: one process per node uses its cores
        ({"BGPT_NPROC_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),
        ({"SLURM_GPUS_PER_NODE": "4"}, None),  # GPUs asked for, count unreadable: an error, not 1
    ],
)
def test_the_sbatch_script_takes_processes_per_node_from_the_gpus_slurm_gives(env, expected):
    import subprocess

    from launch.cluster_cli import SLURM_TEMPLATE

    lines = SLURM_TEMPLATE.read_text().splitlines()
    start = lines.index('if [ -z "${BGPT_NPROC_PER_NODE:-}" ]; then')
    block = "\n".join(lines[start : lines.index("fi", start) + 1])
    done = subprocess.run(
        ["bash", "-c", block + '\necho "$BGPT_NPROC_PER_NODE"'], env=env, capture_output=True, text=True
    )
    if expected is None:
        assert done.returncode == 2 and "set BGPT_NPROC_PER_NODE" in done.stderr
    else:
        assert (done.returncode, done.stdout.strip()) == (0, expected)
