import json

from opendelta_dist.train.loggers import MetricLogger


def test_console_and_jsonl(tmp_path, capsys):
    logger = MetricLogger(["console"], tmp_path, enabled=True)
    logger.log(3, {"loss": 1.5, "lr": 0.1})
    logger.close()
    assert "step 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"split": "train", "step": 3, "loss": 1.5, "lr": 0.1}


def test_only_rank_zero_writes(tmp_path):
    logger = MetricLogger(["console", "tensorboard"], tmp_path, enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_writes_events(tmp_path):
    logger = MetricLogger(["tensorboard"], tmp_path, enabled=True)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_logs_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    logger = MetricLogger(["wandb"], tmp_path, enabled=True, run_name="t", config={"a": 1})
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_console_lines_show_numbers_as_people_read_them(tmp_path, capsys):
    logger = MetricLogger(["console"], tmp_path, enabled=True)
    logger.log(10, {"loss": 0.123456, "tokens_per_s": 14583.4, "lr": 1e-4, "step_count": 3})
    logger.close()
    line = (tmp_path / "train.log").read_text().strip()
    assert line == "train step 10: loss 0.1235  tokens_per_s 14583  lr 0.0001  step_count 3"
    assert "tokens_per_s 14583" in capsys.readouterr().out
