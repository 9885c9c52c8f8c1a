"""RunConfig: defaults < YAML < overrides; unknown keys and bad values are one-line errors."""

import pytest

from launch.cli import main
from trainer.config import build_config, load_config, merge, parse_overrides
from trainer.errors import ConfigError


def test_overrides_beat_the_yaml_file_which_beats_defaults(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  backbone: scratch\n  hidden_size: 32\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, parse_overrides(["--train.lr=0.002", "--lora.target_modules", "q_proj,v_proj"]))
    assert cfg.model.backbone == "scratch" and cfg.model.hidden_size == 32
    assert cfg.train.lr == 0.002
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None and cfg.train.micro_batch_size == 64


def test_values_are_converted_to_the_field_types():
    cfg = build_config(merge({}, parse_overrides(["--train.max_steps=7", "--lora.full_finetune=true"])))
    assert cfg.train.max_steps == 7 and cfg.lora.full_finetune is True
    cfg = build_config({"train": {"max_minutes": "none"}})
    assert cfg.train.max_minutes is None


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"trian": {}}, "unknown config section 'trian'"),
        ({"train": {"learning_rate": 1}}, "unknown config key train.learning_rate"),
        ({"train": {"max_steps": "many"}}, "train.max_steps: expected int"),
        ({"train": {"schedule": "zigzag"}}, "train.schedule 'zigzag'"),
        ({"model": {"transition_gate": True}}, "set model.transition_prior=true too"),
    ],
)
def test_bad_configs_are_refused_with_the_key_named(sections, message):
    with pytest.raises(ConfigError, match=message):
        build_config(sections)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys, dataset):
    args = ["train", "--data", str(dataset), "--out", str(tmp_path / "r")]
    assert main([*args, "--train.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bgpt: error: unknown config key train.nope") and "\n" not in err
    assert main([*args, "--backbone", str(tmp_path / "no-such-model"), "--max-steps", "1"]) == 2
    assert "unknown backbone" in capsys.readouterr().err


def test_the_collective_timeout_reaches_the_process_group_settings():
    from datetime import timedelta

    from trainer.runtime import process_group_kwargs

    cfg = build_config({"train": {"collective_timeout_minutes": "90"}}).train
    assert process_group_kwargs(cfg, world_size=1, cuda=False) == []  # one process: no group at all
    (handler,) = process_group_kwargs(cfg, world_size=2, cuda=False)
    assert (handler.backend, handler.timeout) == ("gloo", timedelta(minutes=90))
    assert build_config({}).train.collective_timeout_minutes == 60
    with pytest.raises(ConfigError, match="collective_timeout_minutes must be > 0"):
        build_config({"train": {"collective_timeout_minutes": 0}})


def test_auto_loader_workers_follow_the_cores_of_each_rank(monkeypatch):
    from trainer.runtime import loader_workers

    def cores(n: int, local_ranks: int = 1) -> None:
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))

    cores(2)
    assert loader_workers(None, cuda=False) == 0  # the step needs both cores (measured)
    assert loader_workers(3, cuda=False) == 3  # a configured count is kept
    cores(16)
    assert loader_workers(None, cuda=False) == 2 and loader_workers(None, cuda=True) == 4
    cores(16, local_ranks=8)  # 8 GPUs share 16 cores: 2 each
    assert loader_workers(None, cuda=True) == 1
    cores(8, local_ranks=8)
    assert loader_workers(None, cuda=True) == 0
