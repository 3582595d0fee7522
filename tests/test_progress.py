"""The progress display and log levels: pure logic, no Ray."""

import io
import logging
import threading

import pytest

from raydpo import cluster
from raydpo.config import DPOConfig
from raydpo.train.progress import ProgressPrinter, progress_line


def test_progress_line_names_the_step_metrics_and_time_left():
    metrics = {"global_step": 5, "epoch": 0.25, "loss": 0.61234, "rewards/accuracies": 0.75, "learning_rate": 2e-5,
               "entropy": 3.2}
    line = progress_line(metrics, 30, seconds_per_step=4.0, seconds_left=100.0)
    assert line == "[raydpo] step 5/30 epoch 0.25 | loss 0.6123 acc 0.75 lr 2e-05 | 4.00 s/step, eta 1m40s"
    assert "s/step" not in progress_line(metrics, 30)  # no rate before a second logged step


def test_printer_prints_each_logged_row_once_in_order_with_a_measured_rate():
    logged, polled = [], threading.Event()

    def fetch(count):
        polled.set()
        return [("log", row) if isinstance(row, dict) else row for row in logged[count:]]

    out = io.StringIO()
    printer = ProgressPrinter(fetch, total_steps=4, interval_s=0.01, out=out)
    clock = iter([100.0, 102.0, 106.0, 108.0])
    printer.line = (lambda original: lambda metrics, now: original(metrics, next(clock)))(printer.line)
    with printer:
        logged.append({"global_step": 1, "epoch": 0.25, "loss": 0.7})
        polled.clear()
        polled.wait(1)
        logged.append({"global_step": 2, "epoch": 0.5, "loss": 0.6})
        logged.append(("save", 2))  # not a logged row: nothing printed
        logged.append({"global_step": 3, "epoch": 0.75, "loss": 0.5})
    logged.append({"global_step": 4, "epoch": 1.0, "loss": 0.4})  # after the run: not this printer's
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["1/4", "2/4", "3/4"]
    assert "s/step" not in lines[0]
    assert lines[1].endswith("2.00 s/step, eta 4s")  # (102 - 100) / (2 - 1) s per step, 2 steps left
    assert lines[2].endswith("3.00 s/step, eta 3s")  # (106 - 100) / (3 - 1)


def test_printer_never_fails_the_run():
    def fetch(count):
        raise ConnectionError("history actor gone")

    out = io.StringIO()
    with ProgressPrinter(fetch, total_steps=2, interval_s=0.01, out=out):
        pass
    assert out.getvalue() == ""


def test_log_level_is_checked_and_maps_onto_ray_levels():
    with pytest.raises(ValueError, match="log_level"):
        DPOConfig(log_level="verbose")
    assert cluster.ray_log_level("passive") == "WARNING"
    assert cluster.ray_log_level("info") == "INFO"


def test_passive_keeps_ray_data_info_out_and_info_lets_it_in():
    data = logging.getLogger("ray.data")
    before = data.level
    try:
        cluster.quiet_logs("passive")
        assert not data.isEnabledFor(logging.INFO) and data.isEnabledFor(logging.WARNING)
        cluster.quiet_logs("info")
        assert data.isEnabledFor(logging.INFO)
    finally:
        data.setLevel(before)
