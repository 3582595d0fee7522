"""The progress display, the driver's event pump (with a mock history and callback handler) and log
levels: pure logic, no Ray."""

import io
import logging
import threading

import pytest

from raydpo import cluster
from raydpo.config import DPOConfig
from raydpo.train.progress import EventPump, ProgressPrinter, progress_line


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
    printer = ProgressPrinter(total_steps=4, out=out)
    clock = iter([100.0, 102.0, 106.0, 108.0])
    printer.line = (lambda original: lambda metrics, now: original(metrics, next(clock)))(printer.line)
    with EventPump(fetch, printer, interval_s=0.01):
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
    with EventPump(fetch, ProgressPrinter(total_steps=2, out=out), interval_s=0.01):
        pass
    assert out.getvalue() == ""


class MockHandler:
    """callbacks.CallbackHandler's part the pump uses: handle(event), and control.should_training_stop."""

    def __init__(self, stop_at=None, fail_at=None):
        self.events, self.stop_at, self.fail_at = [], stop_at, fail_at
        self.control = type("Control", (), {"should_training_stop": False})()

    def handle(self, event):
        self.events.append(event)
        if event == ("end", self.fail_at):
            raise RuntimeError(f"callback failed at step {self.fail_at}")
        if event == ("end", self.stop_at):
            self.control.should_training_stop = True


def run_pump(events, handler, fetch_errors=0, acks=None):
    """Feeds `events` through an EventPump as the history actor would (two at a time, after
    `fetch_errors` failed fetches, while the run is still going), and returns the printed lines and the acks."""
    acks = [] if acks is None else acks
    out, failures, fetched_once = io.StringIO(), iter(range(fetch_errors)), threading.Event()

    def fetch(count):
        if next(failures, None) is not None:
            raise ConnectionError("history actor busy")
        fetched_once.set()
        return events[count:count + 2]

    def ack(step, stop):
        acks.append((step, stop))
        fetched_once.set()  # (a failed fetch with callbacks acks a stop: the run ends then too)

    with EventPump(fetch, ProgressPrinter(total_steps=3, out=out), handler, ack, interval_s=0.01):
        fetched_once.wait(5)  # the run ends only after a fetch went through
    return out.getvalue().splitlines(), acks


RUN = [("log", {"global_step": 1, "epoch": 0.3, "loss": 0.7}), ("end", 1), ("save", 2),
       ("log", {"global_step": 2, "epoch": 0.6, "loss": 0.6}), ("end", 2), ("end", 3)]


def test_pump_hands_every_event_to_the_callbacks_in_order_and_acks_each_step():
    handler = MockHandler(stop_at=2)
    lines, acks = run_pump(RUN, handler)
    assert handler.events == RUN
    assert [line.split()[2] for line in lines] == ["1/3", "2/3"]
    assert acks == [(1, False), (2, True), (3, True)]  # a callback's stop holds for every later step


def test_a_failing_callback_stops_the_workers_and_is_raised_after_the_run():
    handler, acks = MockHandler(fail_at=2), []
    with pytest.raises(RuntimeError, match="callback failed at step 2"):
        run_pump(RUN, handler, acks=acks)
    assert handler.events == RUN[:5]  # nothing after the failure is delivered
    assert acks == [(1, False), (float("inf"), True)]  # every waiting worker is told to stop


def test_a_failed_fetch_is_skipped_by_the_display_but_stops_a_run_with_callbacks():
    lines, acks = run_pump(RUN, None, fetch_errors=2)
    assert [line.split()[2] for line in lines] == ["1/3", "2/3"] and acks == []
    acks = []
    with pytest.raises(ConnectionError):
        run_pump(RUN, MockHandler(), fetch_errors=1, acks=acks)
    assert acks == [(float("inf"), True)]


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
