"""Callbacks: dispatch order and error policy, JSON-lines round trip and resume, TensorBoard read back, console, W&B."""

import io
import json
import math
import sys
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mario_a3c.callbacks import (
    METRIC_NAMES,
    Callback,
    CallbackList,
    ConsoleLogger,
    JsonlLogger,
    TensorBoardLogger,
    WandbLogger,
    read_metrics,
)
from mario_a3c.config import TrainingConfig

# per-episode curves come from on_episode_end; updates carry the rest
UPDATE_NAMES = [n for n in METRIC_NAMES if n not in ("charts/episodic_return", "charts/x_pos")]


def fake_trainer(**kw):
    return SimpleNamespace(
        config=TrainingConfig(run_name="t", total_updates=50, warmup_updates=5), updates=0, frames=0, **kw
    )


def run(cbs, trainer, n=6, frames_per_update=256, start=0):
    "Drive callbacks like a trainer: updates with every design metric, an episode every other update, checkpoints."
    cbs.on_train_begin(trainer)
    sent = []
    for u in range(start + 1, start + n + 1):
        trainer.updates, trainer.frames = u, u * frames_per_update
        m = {"update": u, "frames": trainer.frames, **{k: 1.0 / (u + i) for i, k in enumerate(UPDATE_NAMES)}}
        cbs.on_update(trainer, m)
        sent.append(m)
        if u % 2 == 0:
            cbs.on_episode_end(
                trainer,
                {
                    "update": u,
                    "frames": trainer.frames,
                    "env": 0,
                    "r": float(u),
                    "x": 10 * u,
                    "l": 5 * u,
                    "flag": bool(u % 4 == 0),
                },
            )
        if u % 3 == 0:
            cbs.on_checkpoint(trainer, f"ck/a3c_world1_stage1_step{u}.pt", f"step{u}")
    cbs.on_train_end(trainer, {"updates": trainer.updates, "frames": trainer.frames})
    return sent


def test_dispatch_order_and_end_reaches_everyone():
    log = []

    class R(Callback):
        def __init__(self, name, fail=None):
            self.name, self.fail = name, fail

        def on_train_begin(self, t):
            log.append((self.name, "begin"))

        def on_update(self, t, m):
            log.append((self.name, "update"))

        def on_episode_end(self, t, e):
            log.append((self.name, "episode"))

        def on_checkpoint(self, t, p, tag):
            log.append((self.name, tag))

        def on_train_end(self, t, s):
            log.append((self.name, "end"))
            if self.fail:
                raise self.fail

    run(CallbackList([R("a"), R("b"), R("c")]), fake_trainer(), n=3)
    expected = []
    for event in ["begin", "update", "update", "episode", "update", "step3", "end"]:
        expected += [(n, event) for n in "abc"]
    assert log == expected
    log.clear()
    cbs = CallbackList([R("a", fail=RuntimeError("first")), R("b", fail=OSError("second")), R("c")])
    with pytest.raises(RuntimeError, match="first"):
        cbs.on_train_end(fake_trainer(), {})
    assert log == [("a", "end"), ("b", "end"), ("c", "end")]


def test_update_errors_propagate():
    class Broken(Callback):
        def on_update(self, t, m):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        CallbackList([Broken()]).on_update(fake_trainer(), {"update": 1})
    with pytest.raises(TypeError, match="has none of the hooks"):
        CallbackList([object()])


def test_jsonl_round_trip(tmp_path):
    p = tmp_path / "runs" / "t" / "metrics.jsonl"
    sent = run(CallbackList([JsonlLogger(p)]), fake_trainer())
    ups = read_metrics(p, kind="update")
    assert len(ups) == len(sent)
    for got, want in zip(ups, sent):
        assert got["kind"] == "update" and isinstance(got["time"], float)
        assert {k: got[k] for k in want} == want
    eps = read_metrics(p, kind="episode")
    assert [(e["update"], e["r"], e["x"], e["flag"]) for e in eps] == [
        (2, 2.0, 20, False),
        (4, 4.0, 40, True),
        (6, 6.0, 60, False),
    ]
    for line in p.read_text().splitlines():
        json.loads(line)


def test_jsonl_resume_drops_lines_after_checkpoint_and_torn_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    run(CallbackList([JsonlLogger(p)]), fake_trainer(), n=6)
    with open(p, "a") as f:
        f.write('{"kind": "upd')
    t = fake_trainer()
    t.updates, t.frames = 3, 3 * 256
    run(CallbackList([JsonlLogger(p)]), t, n=2, start=3)
    assert [r["update"] for r in read_metrics(p, kind="update")] == [1, 2, 3, 4, 5]
    assert [r["update"] for r in read_metrics(p, kind="episode")] == [2, 4]


def test_tensorboard_scalars_read_back(tmp_path):
    sent = run(CallbackList([TensorBoardLogger(tmp_path / "tb")]), fake_trainer())
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(METRIC_NAMES) | {"charts/episodic_length"} == set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("charts/x_pos")] == [20.0, 40.0, 60.0]
    for name in UPDATE_NAMES:
        ev = acc.Scalars(name)
        want = [(m["frames"], m[name]) for m in sent]
        assert [e.step for e in ev] == [w[0] for w in want]
        assert np.allclose([e.value for e in ev], [w[1] for w in want], rtol=1e-6)
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_resume_purges_later_events(tmp_path):
    run(CallbackList([TensorBoardLogger(tmp_path)]), fake_trainer(), n=6)
    t = fake_trainer()
    t.updates, t.frames = 3, 3 * 256
    run(CallbackList([TensorBoardLogger(tmp_path)]), t, n=3, start=3)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("losses/total")] == [256 * u for u in range(1, 7)]


def test_console_lines_are_throttled_and_plain():
    out, now = io.StringIO(), [0.0]

    def clock():
        now[0] += 0.4
        return now[0]

    run(CallbackList([ConsoleLogger(every_s=1.0, stream=out, clock=clock)]), fake_trainer(), n=10)
    lines = out.getvalue().splitlines()
    updates = [l for l in lines if l.startswith("update ")]
    assert [l.split()[1] for l in updates] == ["1/50", "4/50", "7/50", "10/50"]  # clock 0.4, 1.6, 2.8, 4.0
    assert lines[0].startswith("train t: world 1-1") and lines[-1] == "done: updates 10, frames 2,560"
    assert sum(l.startswith("checkpoint step") for l in lines) == 3
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_wandb_missing_and_fake(tmp_path):
    with mock.patch.dict(sys.modules, {"wandb": None}):
        with pytest.raises(ImportError) as e:
            WandbLogger("p")
    assert str(e.value) == "wandb is not installed: pip install 'mario-a3c[wandb]'"
    runs = []

    class Run:
        def __init__(self, **kw):
            self.kw, self.logged, self.summary, self.done = kw, [], {}, False

        def log(self, d, step):
            self.logged.append((step, d))

        def finish(self):
            self.done = True

    fake = SimpleNamespace(init=lambda **kw: runs.append(Run(**kw)) or runs[-1])
    with mock.patch.dict(sys.modules, {"wandb": fake}):
        sent = run(CallbackList([WandbLogger("p", mode="offline", dir=tmp_path / "w")]), fake_trainer(), n=4)
    r = runs[0]
    assert r.kw["mode"] == "offline" and r.kw["config"] == fake_trainer().config.to_dict() and r.done
    steps = [s for s, _ in r.logged]
    assert steps == sorted(steps)
    assert [d["losses/total"] for s, d in r.logged if "losses/total" in d] == [
        m["losses/total"] for m in sent
    ]


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_real(tmp_path):
    run(CallbackList([WandbLogger("mario-a3c-test", mode="offline", dir=tmp_path)]), fake_trainer(), n=3)
    assert list(tmp_path.rglob("*.wandb"))
