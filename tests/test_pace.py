"""Where time goes: the epoch line's training pace and a torch.profiler trace on request."""
import json
import re

import train
from conftest import tiny_config, write_config


def test_the_epoch_line_shows_samples_per_second_and_the_data_wait(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "pace"]) == 0
    log = (tmp_path / "saved/log/tiny/pace/info.log").read_text()
    line = next(line for line in log.splitlines() if "epoch 1/1" in line)
    assert re.search(r"  [\d,]+/s data \d+%", line), line


def test_the_pace_counts_every_training_sample_and_no_validation_one(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    config, request = train.parse_args(["-c", str(path)], train.lookups())
    trainer, _, _ = train.build_trainer(config, request)
    for _ in trainer.train_batches(1):
        pass
    assert trainer.pace.samples == 320 - 64 and 0 <= trainer.pace.waited <= trainer.pace.seconds


def test_profile_writes_a_trace_of_the_asked_steps_into_the_log_dir(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=2, profile=3))
    assert train.main(["-c", str(path), "--run-id", "profiled"]) == 0
    traces = list((tmp_path / "saved/log/tiny/profiled/profile").glob("*.pt.trace.json"))
    assert len(traces) == 1, "one trace, from the first epoch only"
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {event["name"] for event in events if event.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"}, steps
