"""alignlib.metrics: metrics.jsonl (trimmed on resume), plots, progress, throughput."""

import json

import numpy as np
import pytest
import torch

from alignlib.distributed import is_main_process
from alignlib.metrics import MetricsLogger, MetricWindow, Progress, Throughput, read_metrics

# ----------------------------------------------------------------------------------------------
# Metrics, progress, helpers
# ----------------------------------------------------------------------------------------------


def test_metrics_are_trimmed_on_resume(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log({"loss": torch.tensor(1.0 / step), "rewards/accuracies": np.float32(0.5)},
                       step=step, epoch=step / 5)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "loss": 0.1')  # torn by a crash
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1] == {"step": 2, "epoch": 0.4, "loss": 0.5, "rewards/accuracies": 0.5}

    with MetricsLogger(tmp_path, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        for step in (4, 5):
            logger.log({"loss": 0.0}, step=step)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert json.loads(lines[3])["loss"] == 0.0

    MetricsLogger(tmp_path).close()  # a fresh run starts an empty file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_metrics_plot(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.log({"loss": 1.0 / step}, step=step)
    try:
        import matplotlib  # noqa: F401 - not a core dependency
    except ImportError:
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            assert logger.plot(tmp_path / "curves.png") is None
        assert not (tmp_path / "curves.png").exists()
    else:
        assert logger.plot(tmp_path / "curves.png") == tmp_path / "curves.png"
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logger.close()


def test_progress_shows_the_latest_metrics():
    with Progress(total=4, initial=1, desc="dpo") as progress:
        progress.update(loss=torch.tensor(0.693147), acc=0.75)
        progress.update()
        assert progress.bar.n == 3
        assert "loss=0.6931" in progress.bar.postfix and "acc=0.75" in progress.bar.postfix


def test_throughput_and_main_process():
    meter = Throughput()
    meter.add(100)
    meter.add(torch.tensor(28))
    assert meter.tokens == 128 and meter.rate() > 0
    meter.reset()
    assert meter.tokens == 0
    assert is_main_process()


def test_metric_window_averages_the_steps_that_trained():
    window = MetricWindow()
    assert window.summary(learning_rate=1e-3) is None  # nothing trained since the last line
    window.add({"rewards/accuracies": 3.0}, loss=0.5, pairs=4, local_pairs=4, grad_norm=2.0)
    window.add({"rewards/accuracies": 1.0}, loss=0.25, pairs=2, local_pairs=2, grad_norm=1.5)
    assert window.local_mean("rewards/accuracies") == 4.0 / 6
    window.tokens.add(60)
    record = window.summary(learning_rate=1e-3)
    assert record["rewards/accuracies"] == 4.0 / 6
    assert record["loss"] == (0.5 * 4 + 0.25 * 2) / 6  # weighted by the pairs of each step
    assert record["learning_rate"] == 1e-3 and record["grad_norm"] == 1.5  # the last step's norm
    assert record["tokens_per_second"] > 0
    assert window.summary() is None  # the window starts afresh after a line
