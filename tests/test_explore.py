"""Demo starts end to end: `mario-a3c explore` writes the shipped demo again from its seed and refuses to overwrite;
training with `demo_starts` records where each episode began and keeps mid-stage starts out of the rolling rates
and the curves."""

import subprocess, sys
from pathlib import Path

import numpy as np

from mario_a3c.callbacks import read_metrics
from mario_a3c.config import TrainingConfig
from mario_a3c.curves import episode_columns
from mario_a3c.envs import load_demo
from mario_a3c.trainer import Trainer
from tiny import BEFORE_RECIPE, QUICK, TINY_NET, outputs

BIN = Path(sys.executable).parent


def explore_cli(*args):
    return subprocess.run(
        [str(BIN / 'mario-a3c'), 'explore', *map(str, args)], capture_output=True, text=True, timeout=900
    )


def test_explore_writes_the_shipped_demo_again(tmp_path):
    "The search is a function of its seed: the 1-4 demo comes out byte for byte, and it replays to the flag."
    res = explore_cli('--stage', '1-4', '--out', tmp_path, '--json')
    assert res.returncode == 0, res.stderr
    made = np.load(tmp_path / '1-4.npy')
    assert np.array_equal(made, load_demo(1, 4))
    assert f'"demo_frames": {len(made)}' in res.stdout.splitlines()[-1]


def test_explore_refuses_to_overwrite(tmp_path):
    mine = tmp_path / '1-1.npy'
    np.save(mine, np.arange(5, dtype=np.uint8))
    before = mine.read_bytes()
    res = explore_cli('--stage', '1-1', '--out', tmp_path, '--max-frames', 100)
    assert res.returncode == 2 and 'exists: pass --force to replace it' in res.stderr, res.stderr
    assert mine.read_bytes() == before
    res = explore_cli('--stage', '1-1', '--out', tmp_path, '--max-frames', 100, '--force', '--json')
    assert res.returncode == 1 and '"flag": false' in res.stdout  # no flag in 100 frames: nothing written
    assert mine.read_bytes() == before


def test_demo_starts_are_recorded_and_kept_out_of_rates_and_curves(tmp_path):
    run = dict(mode='sync', num_envs=2, vectorization='sync', rollout_steps=32, total_updates=12, stage=4)
    cfg = TrainingConfig(**run, demo_starts=0.5, **BEFORE_RECIPE, **TINY_NET, **QUICK, **outputs(tmp_path))
    t = Trainer(cfg)
    t.train()
    eps = read_metrics(cfg.metrics_path, 'episode')
    mid = [e for e in eps if e['demo_frame'] > 0]
    true = [e for e in eps if e['demo_frame'] == 0]
    print(f'{len(eps)} episodes, {len(mid)} from demo frames {sorted(e["demo_frame"] for e in mid)}')
    assert mid and true and all(e['demo_frame'] % 8 == 0 for e in mid)
    assert len(t.window) == len(true)  # the rolling rates see only episodes from the stage's start
    assert np.array_equal(episode_columns(cfg.metrics_path)['x'], [e['x'] for e in true])
