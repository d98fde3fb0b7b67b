"""Training panel without a browser: rate limits, bounded history, frame previews from real trainers, Stop, headless lines."""

import io
import sys
import time
import types

import cv2
import numpy as np
import pytest

from mario_a3c.config import TrainingConfig
from mario_a3c.panels import EvalPanel
from mario_a3c.trainer import Trainer
from mario_a3c.widgets import Every, History, TrainingPanel, widget_frontend


def tiny(tmp_path, **kw):
    "Seconds per update: 2 envs, 8 steps, a tiny network, all output under tmp_path."
    base = dict(
        num_envs=2,
        vectorization='sync',
        size=42,
        channels='4,8',
        blocks=1,
        hidden=32,
        core_size=32,
        rollout_steps=8,
        total_updates=10_000,
        warmup_updates=1,
        amp=False,
        compile=False,
        checkpoint_every=10_000,
        log_every_s=60.0,
        run_name='w',
        runs_dir=str(tmp_path / 'runs'),
        checkpoint_dir=str(tmp_path / 'models'),
        tensorboard_dir=str(tmp_path / 'tb'),
    )
    return TrainingConfig(**{**base, **kw})


def decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def test_every_fires_once_per_period_of_a_fake_clock():
    now = [0.0]
    every = Every(1.0, clock=lambda: now[0])
    fired = 0
    for i in range(1000):  # 0.0 .. 124.875 s in steps of 1/8 s (exact in binary)
        now[0] = i / 8
        fired += every()
    assert fired == 125


def test_panel_rate_limits_frames_progress_and_curves():
    now = [0.0]

    class Fake:
        config, frames, updates = TrainingConfig(total_updates=10, warmup_updates=1), 0, 0

        def preview_frame(self, i):
            return np.full((240, 256, 3), int(now[0] * 8) % 255 + 1, np.uint8)  # never the black placeholder

    p = TrainingPanel(
        frame_every_s=0.5, curves_every_s=4.0, progress_every_s=1.0, widgets=True, clock=lambda: now[0]
    )
    p.trainer = t = Fake()
    p.on_train_begin(t)
    sent = []
    p.frame_img.observe(lambda ch: sent.append(now[0]), 'value')
    for i in range(160):  # 20 s, a tick and an update every 1/8 s
        now[0] = i / 8
        t.frames += 10
        p.on_update(t, {'frames': t.frames, 'perf/fps': 1.0 * i})
        p.tick()
    assert p.frames_shown == len(sent) == 40  # 20 s / 0.5 s
    assert np.all(np.diff(sent) >= 0.5)
    assert p.curves_drawn == 5  # 0, 4, 8, 12, 16 s


def test_unchanged_frame_is_not_sent_again():
    frame = np.zeros((240, 256, 3), np.uint8)
    t = types.SimpleNamespace(
        config=TrainingConfig(total_updates=10, warmup_updates=1),
        frames=0,
        updates=0,
        preview_frame=lambda i: frame,
    )
    now = [0.0]
    p = TrainingPanel(frame_every_s=0.1, widgets=True, clock=lambda: now[0])
    p.trainer = t
    p.on_train_begin(t)
    for i in range(10):
        now[0] = i
        p.tick()
    assert p.frames_shown == 1


def test_history_is_bounded_and_spans_the_run():
    h = History(100)
    for i in range(1_000_000):
        h.add(i, 2 * i)
    xs, ys = h.data()
    assert len(xs) < 100 and xs[0] == 0 and xs[-1] > 1_000_000 * 0.95
    assert np.all(np.diff(xs) == h.stride) and np.all(ys == 2 * xs)


def test_panel_memory_of_curves_stays_bounded():
    p = TrainingPanel(widgets=True, history=50)
    t = types.SimpleNamespace(frames=0)
    for i in range(20_000):
        p.on_update(t, {'frames': i, 'perf/fps': 1.0, 'losses/entropy': 2.0, 'opt/lr': 1e-4})
        p.on_episode_end(t, {'frames': i, 'r': 1.0, 'x': 40})
    assert max(len(h) for h in p.hist.values()) < 50


@pytest.mark.parametrize("vectorization", ["sync", "threads", "async", "gym-async"])
def test_preview_frame_of_a_training_run(tmp_path, vectorization):
    trainer = Trainer(tiny(tmp_path, vectorization=vectorization), log=lambda *a: None)
    assert trainer.preview_frame(0) is None  # no envs yet
    p = TrainingPanel(frame_every_s=0.05, widgets=True, env_index=1)
    p.start(trainer, display=False)
    try:
        t0 = time.monotonic()
        while p.frames_shown < 2 and time.monotonic() - t0 < 90:
            time.sleep(0.05)
        frame = None
        while frame is None and time.monotonic() - t0 < 90:
            frame = trainer.preview_frame(1)
            time.sleep(0.05)
    finally:
        p.stop()
        s = p.wait(90)
    assert p.frames_shown >= 2
    assert frame.shape == (240, 256, 3) and frame.dtype == np.uint8
    assert (
        frame.std() > 10 and len(np.unique(frame.reshape(-1, 3), axis=0)) > 4
    )  # a Mario screen, not a blank
    shown = decode(p.frame_img.value)
    assert shown.shape == (240, 256, 3) and shown.std() > 10
    assert s['stopped'] == 'stop'
    with pytest.raises(ValueError, match='env_index=2 is out of range: allowed 0-1'):
        trainer.preview_frame(2)


def test_stop_button_ends_a_real_run_with_a_checkpoint(tmp_path):
    trainer = Trainer(tiny(tmp_path), log=lambda *a: None)
    p = TrainingPanel(frame_every_s=0.05, curves_every_s=0.5, widgets=True)
    t0 = time.monotonic()
    p.start(trainer, display=False)
    assert time.monotonic() - t0 < 5 and p.thread.is_alive()  # start() returns while training goes on
    while trainer.updates < 2 and time.monotonic() - t0 < 90:
        time.sleep(0.05)
    p.save_now()  # a step<N> checkpoint after the current update
    while trainer.updates < 4 and time.monotonic() - t0 < 90:
        time.sleep(0.05)
    p.stop_btn.click()  # the button's own handler
    s = p.wait(90)
    assert not any(t.is_alive() for t in (p.thread, p.ui, p.plot))
    assert s['stopped'] == 'stop' and s['updates'] < 10_000
    assert s['checkpoint'].endswith('_latest.pt') and (tmp_path / 'models').exists()
    assert p.curves_drawn >= 1 and decode(p.curves_img.value) is not None
    assert p.stop_btn.disabled and 'finished (stop)' in p.status.value
    assert p.bar.max == 1000 and p.bar.value == round(
        1000 * s['frames'] / (10_000 * trainer.config.frames_per_update)
    )
    assert (
        len(list((tmp_path / 'models').glob('a3c_world1_stage1_step*.pt'))) == 1
    )  # Save's, not replaced by the final save


def test_headless_runs_here_and_prints_lines(tmp_path):
    buf = io.StringIO()
    trainer = Trainer(tiny(tmp_path, total_updates=3), default_callbacks=False, log=lambda *a: None)
    p = TrainingPanel(stream=buf, print_every_s=0.0)
    assert p.widgets is False and not hasattr(p, 'widget')
    p.start(trainer)  # blocks: no thread without a frontend
    lines = buf.getvalue().splitlines()
    assert p.thread is None and p.wait()['updates'] == 3
    assert [l.split()[1] for l in lines[:3]] == ['64/192', '128/192', '192/192']
    assert lines[-1].startswith('done: frames 192/192 (100%)')


def test_headless_leaves_lines_to_the_console_logger(tmp_path, capsys):
    trainer = Trainer(
        tiny(tmp_path, total_updates=1), log=lambda *a: None
    )  # standard callbacks print already
    buf = io.StringIO()
    TrainingPanel(stream=buf, print_every_s=0.0).start(trainer)
    assert buf.getvalue() == '' and 'done:' in capsys.readouterr().out


def test_frontend_detection(monkeypatch):
    monkeypatch.delenv('MARIO_A3C_WIDGETS', raising=False)
    assert widget_frontend() is False  # plain pytest process

    def shell(metadata):
        cls = type('ZMQInteractiveShell', (), {})
        ip = cls()
        ip.kernel = types.SimpleNamespace(get_parent=lambda channel: {'metadata': metadata})
        return ip

    import IPython

    monkeypatch.setattr(IPython, 'get_ipython', lambda: shell({'cellId': 'abc'}))
    assert widget_frontend() is True  # JupyterLab sends the cell id
    monkeypatch.setattr(IPython, 'get_ipython', lambda: shell({}))
    assert widget_frontend() is False  # nbclient / papermill do not
    monkeypatch.setenv('MARIO_A3C_WIDGETS', '1')
    assert widget_frontend() is True


def test_eval_panel_headless_lines(tmp_path):
    from mario_a3c.evaluate import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path)
    buf = io.StringIO()
    ep = EvalPanel(stream=buf)
    ep.run(ckpt, episodes=2, max_steps=30)
    res = ep.wait()
    assert len(buf.getvalue().splitlines()) == len(res['episodes']) == 2
    assert [r['steps'] for r in ep.rows.values()] == [e['length'] for e in res['episodes']]


def test_memory_stays_flat_over_many_refreshes():
    import tracemalloc

    rng = np.random.default_rng(0)
    t = types.SimpleNamespace(
        config=TrainingConfig(total_updates=10, warmup_updates=1),
        frames=0,
        updates=0,
        preview_frame=lambda i: rng.integers(0, 255, (240, 256, 3), dtype=np.uint8),
    )
    p = TrainingPanel(frame_every_s=0.0, curves_every_s=1e9, progress_every_s=0.0, widgets=True, history=200)
    p.trainer = t
    p.on_train_begin(t)

    def refresh(n):
        for _ in range(n):
            t.frames += 100
            p.on_update(t, {'frames': t.frames, 'perf/fps': rng.random(), 'losses/entropy': rng.random()})
            p.on_episode_end(t, {'frames': t.frames, 'r': rng.random(), 'x': 100})
            p.tick()

    refresh(250)  # histories full, caches warm (few redraws: cheap)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    p.every['curves'].seconds = 0.0
    refresh(60)  # 60 more frames and curve redraws
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert p.frames_shown == 310 and p.curves_drawn == 61 and grown < 2_000_000, (
        f'{grown} bytes more after 60 refreshes'
    )
