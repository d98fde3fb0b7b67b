"""Trainer end to end: tiny runs for every core, return type and replay setting; resume; stops; env failures for real."""

import copy
import os
import signal
import threading
from functools import partial

import numpy as np
import pytest
import torch

from mario_a3c.callbacks import Callback, METRIC_NAMES, read_metrics
from mario_a3c.checkpoint import capture_rng_state, checkpoint_path, load_checkpoint, load_meta
from mario_a3c.config import TrainingConfig
from mario_a3c.testing import CountingEnv
from mario_a3c.trainer import Trainer, train
from states import same
from tiny import BEFORE_RECIPE, QUICK, TINY_NET, outputs


def tiny(tmp_path, **kw):
    "A few-second run: 2 envs, 6 steps, a tiny network, all output under tmp_path."
    base = dict(mode='sync', num_envs=2, vectorization='sync', window=4, heads=4, rollout_steps=6,
                total_updates=3, per_batch=2, per_warmup=2, **BEFORE_RECIPE, **TINY_NET, **QUICK,
                **outputs(tmp_path, 't'))
    return TrainingConfig(**{**base, **kw})


class StopAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_update(self, trainer, metrics):
        if metrics['update'] == self.n:
            trainer.stop()


@pytest.mark.parametrize("per", [False, True])
@pytest.mark.parametrize("returns", ["vtrace", "gae"])
@pytest.mark.parametrize("core", ["lstm", "gru", "transformer", "none"])
def test_tiny_mario_run(tmp_path, core, returns, per):
    cfg = tiny(tmp_path, recurrent_type=core, returns=returns, per=per)
    t = Trainer(cfg)
    s = t.train()
    assert (s['stopped'], s['updates'], s['frames']) == ('done', 3, 3 * 6 * 2 * 4)
    assert (t.env_builds, s['env_restarts'], s['nan_skips']) == (
        1,
        0,
        0,
    )  # one env build, nothing retried or skipped
    ups = read_metrics(cfg.metrics_path, 'update')
    assert [u['update'] for u in ups] == [1, 2, 3]
    assert [u['frames'] for u in ups] == [48, 96, 144]
    for u in ups:
        assert {
            'losses/policy',
            'losses/value',
            'losses/entropy',
            'losses/total',
            'opt/lr',
            'opt/grad_norm',
            'perf/fps',
            'perf/updates_per_s',
            'vtrace/rho_mean',
        } <= set(u)
        assert np.isfinite(u['losses/total']) and u['opt/skipped'] == 0.0
    if per:
        assert [('replay/mean_weight' in u) for u in ups] == [
            False,
            True,
            True,
        ]  # replay starts after per_warmup=2
        assert ups[-1]['replay/size'] == 6
    state, meta = load_checkpoint(s['checkpoint'])
    assert os.path.basename(s['checkpoint']) == 'a3c_world1_stage1_latest.pt'
    assert (meta['updates'], meta['frames'], meta['config']['recurrent_type']) == (3, 144, core)
    assert state['learner']['steps'] == 3


def test_reuse_takes_epochs_x_minibatches_steps_and_resumes(tmp_path):
    "PPO-style reuse: each update is epochs * minibatches optimizer steps; resume keeps the counters of an uninterrupted run."
    kw = dict(total_updates=4, epochs=2, minibatches=2, ppo_clip=0.2, per=True)
    s1 = Trainer(tiny(tmp_path, **kw), callbacks=[StopAt(2)], env_fn=CountingEnv).train()
    r = Trainer.from_checkpoint(s1['checkpoint'], env_fn=CountingEnv)
    r.train()
    full = Trainer(tiny(tmp_path / 'full', **kw), env_fn=CountingEnv)
    full.train()
    ups = read_metrics(tiny(tmp_path).metrics_path, 'update')
    assert [u['opt/steps'] for u in ups] == [4.0] * 4 and all('ppo/clip_frac' in u for u in ups)
    assert [u['frames'] for u in ups] == [48 * k for k in range(1, 5)]  # an update still consumes one rollout
    assert (
        (r.learner.steps, r.learner.sched.last_epoch)
        == (full.learner.steps, full.learner.sched.last_epoch)
        == (4, 4)
    )
    assert (
        r.learner.opt.state_dict()['state'][0]['step']
        == full.learner.opt.state_dict()['state'][0]['step']
        == 16
    )
    assert all(torch.isfinite(p).all() for p in r.model.parameters())


def test_metric_names_are_the_designed_ones(tmp_path):
    s = Trainer(tiny(tmp_path, per=True), env_fn=partial(CountingEnv, length=3)).train()
    names = set().union(*(u.keys() for u in read_metrics(tiny(tmp_path).metrics_path, 'update')))
    assert (
        set(METRIC_NAMES) - {'charts/episodic_return', 'charts/x_pos'} <= names
    )  # those two are per episode
    eps = read_metrics(tiny(tmp_path).metrics_path, 'episode')
    assert len(eps) == s['episodes'] > 0 and {'r', 'x', 'l', 'flag', 'frames', 'update'} <= set(eps[0])


def test_resume_continues_counters_and_curves(tmp_path):
    cfg = tiny(tmp_path, total_updates=8, per=True)
    s1 = Trainer(cfg, callbacks=[StopAt(4)], env_fn=CountingEnv).train()
    assert (s1['stopped'], s1['updates']) == ('stop', 4)
    r = Trainer.from_checkpoint(s1['checkpoint'], env_fn=CountingEnv)
    assert (r.updates, r.frames, r.episodes, r.learner.steps) == (4, 4 * 48, s1['episodes'], 4)
    s2 = r.train()
    full = Trainer(tiny(tmp_path / 'full', total_updates=8, per=True), env_fn=CountingEnv)
    s3 = full.train()
    for k in ('stopped', 'updates', 'frames'):
        assert s2[k] == s3[k]
    assert (
        (r.learner.steps, r.learner.sched.last_epoch)
        == (full.learner.steps, full.learner.sched.last_epoch)
        == (8, 8)
    )
    assert (
        r.learner.opt.state_dict()['state'][0]['step']
        == full.learner.opt.state_dict()['state'][0]['step']
        == 8
    )
    assert r.learner.opt.param_groups[0]['lr'] == full.learner.opt.param_groups[0]['lr']
    assert [u['update'] for u in read_metrics(cfg.metrics_path, 'update')] == list(range(1, 9))
    frames = [u['frames'] for u in read_metrics(cfg.metrics_path, 'update')]
    assert frames == [48 * k for k in range(1, 9)]
    assert len(os.listdir(tmp_path / 'tb' / 't')) >= 2  # both sessions wrote into the same TensorBoard run


def test_round_trip_restores_weights_optimizer_rng_and_best_score(tmp_path):
    "A checkpoint brings back what the run goes on from: weights, optimizer moments, schedule, RNG streams, best score."

    class AtSave(Callback):  # the live trainer at the moment `latest` is written
        def on_checkpoint(self, trainer, path, tag):
            if tag == 'latest':
                self.rng, self.best = capture_rng_state(trainer.replay.rng), trainer.best_avg_return
                self.window = list(trainer.window)
                self.model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
                self.learner = copy.deepcopy(trainer.learner.state_dict())

    at = AtSave()
    cfg = tiny(tmp_path, total_updates=4, checkpoint_every=4, per=True, avg_window=2)
    s = Trainer(cfg, callbacks=[at], env_fn=partial(CountingEnv, length=2)).train()
    assert (
        s['updates'] == 4 and at.best is not None and len(at.window) == 2
    )  # episodes ended: a best score exists
    moments = at.learner['optimizer']['state'][0]
    assert moments['exp_avg'].abs().sum() > 0 and moments['exp_avg_sq'].abs().sum() > 0
    fresh = Trainer(tiny(tmp_path / 'fresh', per=True, avg_window=2), env_fn=CountingEnv)
    assert (
        not same(capture_rng_state(fresh.replay.rng), at.rng) and fresh.best_avg_return is None
    )  # what a restore must undo

    r = Trainer.from_checkpoint(s['checkpoint'], env_fn=CountingEnv)
    assert same(capture_rng_state(r.replay.rng), at.rng)  # python, numpy (global and replay), torch: as saved
    assert r.best_avg_return == at.best and list(r.window) == at.window
    assert same(r.model.state_dict(), at.model)
    assert same(
        r.learner.state_dict(), at.learner
    )  # AdamW moments and step counts, schedule, scaler, counters
    state, _ = load_checkpoint(s['checkpoint'])
    assert same(r.state_dict(), state)  # and saving again writes back what was loaded


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    cfg = tiny(tmp_path, total_updates=5, checkpoint_every=2)

    class CrashAt(Callback):
        def on_update(self, trainer, metrics):
            if metrics['update'] == 3:
                raise RuntimeError('crash')

    with pytest.raises(RuntimeError, match='crash'):
        Trainer(cfg, callbacks=[CrashAt()], env_fn=CountingEnv).train()  # update 3 logged, checkpoint is at 2
    s = Trainer.from_checkpoint(
        checkpoint_path(cfg.checkpoint_dir, 1, 1, 'latest'), env_fn=CountingEnv
    ).train()
    assert s['updates'] == 5
    assert [u['update'] for u in read_metrics(cfg.metrics_path, 'update')] == [1, 2, 3, 4, 5]


def test_resume_rejects_conflicting_immutable_override(tmp_path):
    s = Trainer(tiny(tmp_path, total_updates=1), env_fn=CountingEnv).train()
    with pytest.raises(ValueError, match="cannot resume with channels='8,8'"):
        Trainer.from_checkpoint(s['checkpoint'], {'channels': '8,8'})
    r = Trainer.from_checkpoint(s['checkpoint'], {'lr': 1e-3, 'total_updates': 2}, env_fn=CountingEnv)
    assert (r.config.lr, r.config.total_updates, r.updates) == (1e-3, 2, 1)


def test_killed_worker_rebuilds_and_training_continues(tmp_path):
    killed, groups = [], []

    class KillWorker(Callback):
        def on_update(self, trainer, metrics):
            groups.append(trainer.actors.envs.num_groups)  # rollouts double-buffered over two env groups
            if metrics['update'] == 1:
                pid = trainer.actors.envs.processes[-1].pid
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    notes = []
    t = Trainer(
        tiny(tmp_path, vectorization='async', total_updates=3), callbacks=[KillWorker()], log=notes.append
    )
    s = t.train()
    assert killed and (s['stopped'], s['updates'], s['env_restarts']) == ('done', 3, 1)
    assert groups == [2, 2, 2]
    assert t.env_builds == 2 and any('rebuilding the envs (restart 1/5)' in n for n in notes)
    assert [u['update'] for u in read_metrics(t.config.metrics_path, 'update')] == [1, 2, 3]


def test_every_core_acting_means_lock_step(tmp_path):
    groups, before = [], torch.get_num_threads()

    class Groups(Callback):
        def on_update(self, trainer, metrics):
            groups.append(trainer.actors.envs.num_groups)

    try:  # with as many acting threads as cores, double buffering would take the workers' cores: one group
        s = Trainer(
            tiny(tmp_path, vectorization='async', threads=os.cpu_count(), total_updates=1),
            callbacks=[Groups()],
        ).train()
    finally:
        torch.set_num_threads(before)
    assert s['stopped'] == 'done' and groups == [1]


@pytest.mark.parametrize("vectorization", ["async", "threads"])
def test_hung_worker_rebuilds_then_gives_up(tmp_path, vectorization):
    notes = []  # a hung thread cannot be killed: it is left asleep, and its envs are rebuilt all the same
    cfg = tiny(tmp_path, vectorization=vectorization, total_updates=10, step_timeout=1.0, max_env_restarts=1)
    s = Trainer(
        cfg, env_fn=partial(CountingEnv, hang_at=9), log=notes.append
    ).train()  # each new env hangs at step 9
    assert (s['stopped'], s['updates'], s['env_restarts']) == ('env_failures', 2, 1)  # 6 + 6 steps, 6 more
    assert 'TimeoutError' in notes[0] and 'restart 1/1' in notes[0] and 'used up' in notes[1]
    assert all('within 1.0 s' in n for n in notes), (
        notes
    )  # each wait gave up after step_timeout, not the env's hour
    assert load_meta(s['checkpoint'])['updates'] == 2


def test_nan_streak_stops_with_a_checkpoint(tmp_path):
    notes = []
    s = Trainer(
        tiny(tmp_path, total_updates=50, max_nan_steps=3),
        env_fn=partial(CountingEnv, nan_at=10),
        log=notes.append,
    ).train()
    assert (s['stopped'], s['nan_skips']) == ('nan', 3)
    assert s['updates'] == 4  # updates 1 clean; 2, 3, 4 see NaN rewards (steps 10+)
    state, meta = load_checkpoint(s['checkpoint'])
    assert meta['updates'] == 4 and state['learner']['steps'] == 1
    assert all(torch.isfinite(v).all() for v in state['model'].values())
    assert any('non-finite' in n for n in notes)


def test_ctrl_c_saves_and_returns_a_summary(tmp_path):
    class Interrupt(Callback):
        def on_update(self, trainer, metrics):
            if metrics['update'] == 2:
                raise KeyboardInterrupt

    s = Trainer(
        tiny(tmp_path, total_updates=5), callbacks=[Interrupt()], env_fn=CountingEnv, log=lambda m: None
    ).train()
    assert (s['stopped'], s['updates']) == ('interrupted', 2)
    assert load_meta(s['checkpoint'])['updates'] == 2


def test_stop_from_another_thread(tmp_path):
    t = Trainer(tiny(tmp_path, total_updates=100000, warmup_updates=1), env_fn=CountingEnv)
    threading.Timer(1.0, t.stop).start()
    s = t.train()
    assert s['stopped'] == 'stop' and 0 < s['updates'] < 100000
    assert load_meta(s['checkpoint'])['updates'] == s['updates']


def test_best_and_step_checkpoints(tmp_path):
    seen = []

    class Watch(Callback):
        def on_update(self, trainer, metrics):
            seen.append((len(trainer.window), trainer.avg_return))

    cfg = tiny(tmp_path, total_updates=6, checkpoint_every=2, keep_step_checkpoints=True, avg_window=4)
    t = Trainer(cfg, callbacks=[Watch()], env_fn=partial(CountingEnv, length=2))
    t.train()
    d = tmp_path / 'models'
    assert {p.name for p in d.glob('*.pt')} == {
        f'a3c_world1_stage1_{tag}.pt' for tag in ('latest', 'best', 'step2', 'step4', 'step6')
    }
    assert t.best_min_episodes == 4
    best = max(a for n, a in seen if n >= 4)
    assert load_meta(d / 'a3c_world1_stage1_best.pt')['best_avg_return'] == pytest.approx(best)
    assert load_meta(d / 'a3c_world1_stage1_step4.pt')['updates'] == 4


def test_train_convenience_and_errors(tmp_path):
    s = train(tiny(tmp_path), total_updates=1)
    assert (s['stopped'], s['updates']) == ('done', 1)
    with pytest.raises(ValueError, match='hidden=0'):
        train(dict(hidden=0))
    with pytest.raises(ValueError, match='config must be a TrainingConfig'):
        Trainer({'world': 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("core", ["lstm", "transformer"])
def test_tiny_run_on_cuda_with_amp(tmp_path, core):
    cfg = tiny(tmp_path, device='cuda', amp=True, recurrent_type=core, per=True)
    t = Trainer(cfg, env_fn=CountingEnv)
    s = t.train()
    assert (s['stopped'], s['updates']) == ('done', 3) and t.learner.scaler.is_enabled()
    r = Trainer.from_checkpoint(s['checkpoint'], {'total_updates': 4}, env_fn=CountingEnv)
    assert r.learner.scaler.get_scale() == t.learner.scaler.get_scale()
    assert r.train()['updates'] == 4
