"""Live progress: lines off a terminal, bars on one, RUN/steps.jsonl and RUN/tb, from the trainer's own reads."""
import io
import json
import re
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_engine import StopAt, tiny_setup

from prunekit.progress import Progress, duration, read_steps

LINE = re.compile(r"epoch (\d+)/(\d+) step (\d+)/(\d+) loss=(\S+) lr=(\S+) images/s=(\d+) eta=(\d+:\d\d(?::\d\d)?)$")


def with_progress(trainer, **options):
    trainer.progress = Progress(trainer.epochs, trainer.log, run_dir=trainer.run_dir, **options)
    return trainer


def test_duration():
    assert [duration(s) for s in (0, 59.6, 61, 3723)] == ["0:00", "1:00", "1:01", "1:02:03"]


def test_off_a_terminal_a_line_at_each_read_once_the_interval_has_passed():
    """Reads every 2 steps, 10 s a step, a line at most every 30 s: at 20 s (the first), 60 s and 100 s."""
    now, lines = [0.0], []
    progress = Progress(2, lines.append, terminal=False, every_s=30, clock=lambda: now[0])
    progress.start_epoch(0, 10)
    for step in range(10):
        progress.step(step, 0.1 * (step + 1))
        now[0] += 10
        if (step + 1) % 2 == 0:
            progress.read(step + 1, 2.0 / (step + 1), 160 * (step + 1))
    assert [LINE.match(line).groups() for line in lines] == [
        ("1", "2", "2", "10", "1", "0.2", "16", "3:00"),  # 18 steps left at 10 s each
        ("1", "2", "6", "10", "0.3333", "0.6", "16", "2:20"),
        ("1", "2", "10", "10", "0.2", "1", "16", "1:40")]


def test_a_run_off_a_terminal_prints_progress_lines_with_every_number(tmp_path):
    lines = []
    trainer = tiny_setup(tmp_path, "sss", epochs=2, images=128)
    trainer.log, trainer.check_every = lines.append, 3
    with_progress(trainer, terminal=False, every_s=0)
    history = trainer.fit()
    progress = [LINE.match(line) for line in lines if line.startswith("epoch ")]
    assert [(m[1], m[3]) for m in progress] == [("1", "3"), ("1", "6"), ("2", "3"), ("2", "6")]
    assert all(float(m[5]) > 0 and float(m[6]) > 0 and int(m[7]) > 0 for m in progress)
    assert len([line for line in lines if line.startswith("epoch=")]) == len(history) == 2


def test_on_a_terminal_one_bar_per_epoch_with_the_numbers_and_a_bar_per_evaluation(tmp_path):
    lines, stream = [], io.StringIO()
    trainer = tiny_setup(tmp_path, "none", epochs=2, images=128)
    trainer.log, trainer.check_every = lines.append, 3
    with_progress(trainer, terminal=True, stream=stream)
    trainer.fit()
    shown = stream.getvalue()
    for epoch in (1, 2):
        kept = [part for part in shown.split("\r") if part.startswith(f"epoch {epoch}/2: 100%")][-1]
        # the epoch's own figures; tqdm pads with blanks over a longer previous draw (its length varies with timing)
        assert re.search(r"8/8 \[.*, loss=\S+ lr=\S+ images/s=\d+\] *\n", kept), kept
    assert "\rtest:   0%|          | 0/8" in shown  # the evaluation's bar, cleared when it ends
    assert [line for line in lines if line.startswith("epoch ")] == []  # no progress lines besides the bars


def test_the_bar_carries_each_steps_lr_and_the_last_reads_numbers():
    progress = Progress(1, print, terminal=True, stream=io.StringIO())
    progress.start_epoch(0, 10)
    for step in range(4):
        progress.step(step, 0.05)
    progress.read(4, 1.5, 64)
    assert re.fullmatch(r"loss=1.5 lr=0.05 images/s=\d+ eta=\d+:\d\d", progress.bar.postfix)
    progress.step(4, 0.04)  # each step's LR, with the last read's other numbers
    assert re.fullmatch(r"loss=1.5 lr=0.04 images/s=\d+ eta=\d+:\d\d", progress.bar.postfix)
    progress.close()


def test_steps_jsonl_holds_every_steps_lr_and_each_reads_loss_and_speed(tmp_path):
    trainer = tiny_setup(tmp_path, "none", epochs=2, images=128)
    trainer.check_every = 3
    trainer.fit()
    records = read_steps(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 17))
    assert [r["epoch"] for r in records] == [e + s / 8 for e in range(2) for s in range(8)]
    assert [r["lr"] for r in records] == [trainer.policy.lr_at(r["epoch"]) for r in records]
    read = [r["step"] for r in records if "loss" in r]
    assert read == [3, 6, 11, 14]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in records if "loss" in r)


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_gets_the_same_scalars(tmp_path):
    trainer = tiny_setup(tmp_path, "sss", epochs=2, images=128)
    trainer.check_every = 3
    history = trainer.fit()
    records = [r for r in read_steps(tmp_path) if "loss" in r]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/images_per_s", "images_per_s")):
        assert scalars(tmp_path, tag) == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], tag
    assert scalars(tmp_path, "epoch/test_acc") == [(8, pytest.approx(history[0]["test_acc"])),
                                                   (16, pytest.approx(history[1]["test_acc"]))]


def test_a_resumed_run_records_each_step_once(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        tiny_setup(tmp_path, "none", callbacks=[StopAt(2)]).fit()
    with open(tmp_path / "steps.jsonl", "a") as file:  # an epoch the checkpoint lacks, then a killed append
        file.write(json.dumps({"step": 9, "epoch": 2.0, "lr": 1.0}) + '\n{"step": 9, "epoch": "2", "lr": 1}\n{"step": 10, "ep')
    trainer = tiny_setup(tmp_path, "none")
    history = trainer.fit(resume=True)
    assert [r["step"] for r in read_steps(tmp_path)] == list(range(1, 13))
    assert "ep" not in (tmp_path / "steps.jsonl").read_text().splitlines()[-1][-4:]
    # two event files (before and after the kill) whose read order follows their names, not their steps
    accuracy = dict(scalars(tmp_path, "epoch/test_acc"))
    assert sorted(accuracy) == [4, 8, 12] and len(scalars(tmp_path, "epoch/test_acc")) == 3
    assert accuracy[12] == pytest.approx(history[-1]["test_acc"])


def test_a_fresh_run_starts_its_records_over(tmp_path):
    tiny_setup(tmp_path / "run", "none", epochs=1).fit()
    (tmp_path / "run" / "checkpoints").rename(tmp_path / "old")  # what --force leaves behind
    tiny_setup(tmp_path / "run", "none", epochs=2).fit()
    assert [r["step"] for r in read_steps(tmp_path / "run")] == list(range(1, 9))
    assert [s for s, _ in scalars(tmp_path / "run", "epoch/test_acc")] == [4, 8]


def test_without_tensorboard_the_run_goes_on_and_writes_no_events(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    tiny_setup(tmp_path, "none", epochs=1).fit()
    assert not (tmp_path / "tb").exists()
    assert len(read_steps(tmp_path)) == 4
