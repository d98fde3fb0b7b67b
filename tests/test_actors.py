"""Asynchronous mode: actor processes end to end, resume, restarts of killed/failing actors, back-pressure, shutdown."""

import json
import os
import signal
import threading
import time
import types
from functools import partial

import numpy as np
import psutil
import pytest

from mario_a3c.callbacks import Callback, read_metrics
from mario_a3c.config import TrainingConfig
from mario_a3c.testing import CountingEnv
from mario_a3c.trainer import Trainer
from tiny import BEFORE_RECIPE, QUICK, TINY_NET, outputs


def tiny(tmp_path, **kw):
    "A few-second asynchronous run: 2 actors with 2 envs each, 6 steps, a tiny network, all output under tmp_path."
    base = dict(mode='async', actors=2, num_envs=4, queue_size=4, rollout_steps=6, total_updates=4,
                **BEFORE_RECIPE, **TINY_NET, **QUICK, **outputs(tmp_path, 't'))
    return TrainingConfig(**{**base, **kw})


class Watch(Callback):
    "Record metrics and actor pids; optionally act at an update: fn(trainer, update)."

    def __init__(self, fn=None):
        self.fn, self.metrics, self.pids = fn, [], set()

    def on_update(self, trainer, metrics):
        self.metrics.append(dict(metrics))
        self.pids |= {p.pid for p in trainer.actors.processes}
        if self.fn:
            self.fn(trainer, metrics['update'])


def alive(pids):
    "The pids that still run (zombies count as gone)."
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_vtrace_is_required():
    with pytest.raises(ValueError, match="returns='gae' with mode='async': allowed vtrace"):
        TrainingConfig(mode='async', returns='gae')
    with pytest.raises(ValueError, match="num_envs=8 is not a multiple of actors=3"):
        TrainingConfig(mode='async', actors=3)
    TrainingConfig(mode='sync', returns='gae', actors=3)  # the actor fields matter only in async mode


@pytest.mark.parametrize(
    "cpus,actors,backlog,want",
    [(2, 2, 0, 1), (2, 2, 2, 2), (16, 4, 0, 12), (16, 4, 3, 12), (16, 4, 4, 16), (2, 1, 0, 1)],
)
def test_async_learner_threads_follow_who_waits(tmp_path, monkeypatch, cpus, actors, backlog, want):
    "The cores the actors leave (at least one), or every torch thread when a batch is already waiting for the learner."
    monkeypatch.setattr(os, 'cpu_count', lambda: cpus)
    t = Trainer(tiny(tmp_path, actors=actors, num_envs=4 * actors, queue_size=2 * actors), env_fn=CountingEnv)
    t.learn_threads = cpus  # torch's default: one per core
    t.actors = types.SimpleNamespace(
        pending=[object()] * backlog
    )  # rollouts queued after this update's batch
    assert t._learn_threads() == want
    sync = Trainer(tiny(tmp_path, mode='sync'), env_fn=CountingEnv)
    sync.learn_threads = cpus
    sync.actors = t.actors
    assert sync._learn_threads() == cpus


def test_async_end_to_end_checkpoint_and_resume(tmp_path):
    cfg = tiny(tmp_path, total_updates=6)
    w = Watch(lambda t, u: t.stop() if u == 3 else None)
    s1 = Trainer(cfg, [w], env_fn=CountingEnv).train()
    assert (s1['stopped'], s1['updates'], s1['frames']) == ('stop', 3, 3 * 6 * 4 * 4)
    assert s1['episodes'] > 0 and os.path.exists(s1['checkpoint'])
    m = w.metrics[-1]
    for k in (
        'async/policy_lag',
        'async/policy_lag_max',
        'async/learner_wait_s',
        'async/actor_put_wait_s',
        'async/queue',
        'async/actor_restarts',
        'losses/policy',
        'perf/fps',
    ):
        assert k in m and np.isfinite(m[k]), k
    assert all(0 <= x['async/policy_lag'] <= x['async/policy_lag_max'] <= x['update'] for x in w.metrics)
    assert len(w.pids) == 2 and alive(w.pids) == []
    r = Trainer.from_checkpoint(s1['checkpoint'], env_fn=CountingEnv)
    assert (r.config.mode, r.updates, r.frames, r.episodes) == ('async', 3, s1['frames'], s1['episodes'])
    s2 = r.train()
    assert (s2['stopped'], s2['updates'], s2['frames']) == ('done', 6, 6 * 6 * 4 * 4)
    assert s2['episodes'] > s1['episodes']
    updates = [u['update'] for u in read_metrics(cfg.metrics_path, 'update')]
    assert updates == [1, 2, 3, 4, 5, 6]
    assert all('async/policy_lag' in u for u in read_metrics(cfg.metrics_path, 'update'))


def test_killed_actor_is_restarted(tmp_path):
    killed, notes = [], []

    def kill(trainer, update):
        if update == 2:
            pid = trainer.actors.processes[0].pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    w = Watch(kill)
    s = Trainer(tiny(tmp_path, total_updates=6), [w], env_fn=CountingEnv, log=notes.append).train()
    assert (s['stopped'], s['updates'], s['env_restarts']) == ('done', 6, 1), (s, notes)
    assert any(
        f"actor 0 (pid {killed[0]}) died" in n and 'restarting it (restart 1/5)' in n for n in notes
    ), notes
    assert w.metrics[-1]['async/actor_restarts'] == 1
    assert len(w.pids) == 3 and alive(w.pids) == []


def test_failing_actors_use_up_the_restarts(tmp_path):
    notes = []
    s = Trainer(
        tiny(tmp_path, total_updates=50, max_env_restarts=2),
        env_fn=partial(CountingEnv, fail_at=15),
        log=notes.append,
    ).train()
    assert (s['stopped'], s['env_restarts']) == ('env_failures', 2), (s, notes)
    assert 'max_env_restarts=2 used up: stopping' in notes[-1], notes


def test_hung_actor_is_restarted(tmp_path):
    notes = []
    s = Trainer(
        tiny(tmp_path, total_updates=50, max_env_restarts=1, step_timeout=3.0),
        env_fn=partial(CountingEnv, hang_at=20),
        log=notes.append,
    ).train()
    assert (s['stopped'], s['env_restarts']) == ('env_failures', 1), (s, notes)
    assert any('sent no rollout for' in n and 'restarting it' in n for n in notes), notes


def test_back_pressure_bounds_the_queue(tmp_path):
    pools = []

    def slow(trainer, update):
        pools.append(trainer.actors)
        time.sleep(0.6)  # a learner much slower than the actors

    w = Watch(slow)
    s = Trainer(tiny(tmp_path, total_updates=6, queue_size=4), [w], env_fn=CountingEnv).train()
    assert s['updates'] == 6
    pool = pools[0]
    assert pool.max_queue <= 4 and max(m['async/queue'] for m in w.metrics) <= 4
    assert pool.slots.n == 4  # the shared memory is all there is
    # the actors had to wait for free buffers once the queue was full
    assert max(m['async/actor_put_wait_s'] for m in w.metrics[2:]) > 0.2, [
        m['async/actor_put_wait_s'] for m in w.metrics
    ]
    assert max(m['async/policy_lag_max'] for m in w.metrics) >= 1


@pytest.mark.parametrize('how', ['stop', 'ctrl-c'])
def test_stop_and_ctrl_c_leave_no_processes(tmp_path, how):
    def act(trainer, update):
        if update == 2:
            if how == 'stop':
                trainer.stop()
            else:
                raise KeyboardInterrupt

    w = Watch(act)
    s = Trainer(tiny(tmp_path, total_updates=50), [w], env_fn=CountingEnv).train()
    assert s['stopped'] == ('stop' if how == 'stop' else 'interrupted') and s['updates'] == 2
    assert len(w.pids) == 2
    time.sleep(0.2)
    assert alive(w.pids) == []


def test_real_mario_two_actors_with_preview(tmp_path):
    frames = []

    class Panel(
        Callback
    ):  # asks for env 1's frame from another thread while training runs, like the JupyterLab panel
        def on_train_begin(self, trainer):
            def poll():
                deadline = time.monotonic() + 60
                while not frames and time.monotonic() < deadline:
                    f = trainer.preview_frame(1)
                    if f is not None:
                        frames.append(f)
                    time.sleep(0.05)

            threading.Thread(target=poll, daemon=True).start()

    w = Watch()
    cfg = tiny(tmp_path, num_envs=2, queue_size=2, size=84, rollout_steps=8, total_updates=4)
    s = Trainer(cfg, [w, Panel()]).train()
    assert (s['stopped'], s['updates'], s['frames']) == ('done', 4, 4 * 8 * 2 * 4)
    assert np.isfinite(w.metrics[-1]['losses/total'])
    assert alive(w.pids) == []
    # the panel's frame of env 1, answered by the second actor
    assert frames and frames[0].shape == (240, 256, 3) and frames[0].dtype == np.uint8 and frames[0].std() > 0


TINY_FLAGS = (
    '--num-envs 2 --actors 2 --queue-size 2 --size 42 --channels 4,8 --blocks 1 --hidden 16 '
    '--core-size 16 --rollout-steps 4 --no-amp --no-compile'
).split()


def test_cli_train_async(tmp_path, capsys):
    from mario_a3c.cli import main

    rc = main(
        [
            'train',
            '--mode',
            'async',
            *TINY_FLAGS,
            '--total-updates',
            '2',
            '--warmup-updates',
            '1',
            '--run-name',
            'cli',
            '--runs-dir',
            str(tmp_path / 'runs'),
            '--checkpoint-dir',
            str(tmp_path / 'models'),
            '--tensorboard-dir',
            str(tmp_path / 'tb'),
        ]
    )
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and (s['stopped'], s['updates'], s['frames']) == ('done', 2, 2 * 4 * 2 * 4)
    assert json.loads((tmp_path / 'runs' / 'cli' / 'config.json').read_text())['mode'] == 'async'


def test_cli_bench_both_json_last_line(capsys):
    from mario_a3c.cli import main

    rc = main(
        [
            'bench',
            '--mode',
            'both',
            '--json',
            '--seconds',
            '3',
            '--warmup',
            '2',
            *TINY_FLAGS,
            '--actors-list',
            '1,2',
        ]
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    for k in ('raw_fps', 'train_fps_sync', 'train_fps_async', 'ratio_sync', 'ratio_async'):
        assert last[k] > 0, k
    assert abs(last['ratio_async'] - last['train_fps_async'] / last['raw_fps']) < 1e-2
    assert [r['actors'] for r in last['scaling']] == [1, 2]
    assert 'async/learner_wait_s' in last['profile']['async'] and 'perf/learn_s' in last['profile']['sync']
    u = last['cpu_util']  # the machine's CPU while each side ran
    assert set(u) == {'raw', 'sync', 'async'} and all(0 < x <= 1 for x in u.values())
    for m in (
        'sync',
        'async',
    ):  # the frames per CPU-second of the mode against the raw emulators', recomputed
        want = last[f'train_fps_{m}'] / u[m] / (last['raw_fps'] / u['raw'])
        assert abs(last[f'ratio_at_full_cpu_{m}'] - want) < 0.02 * want + 2e-3, m


def test_cold_envs_act_apart_in_the_actor_processes(tmp_path):
    "The run's last half of envs (the second actor's) are the cold ones: their stored log-probs are a colder draw's."
    import torch
    cfg = tiny(tmp_path, total_updates=3, cold_envs=0.5, cold_temperature=1e-3, ppo_clip=0.2, epochs=2)
    seen, flags = [], []

    class Spy(Callback):
        def on_train_begin(self, trainer):
            collect = trainer._collect
            flags.append(trainer.learner.decoupled)

            def spy():
                out = collect()
                seen.append((out.rollout.behaviour_logp.clone(), list(out.env_ids)))
                return out

            trainer._collect = spy

    w = Watch()
    s = Trainer(cfg, [Spy(), w], env_fn=CountingEnv).train()
    assert s['updates'] == 3 and len(seen) == 3 and flags == [True]
    by_env = {i: torch.cat([lp[:, k] for lp, ids in seen for k, j in enumerate(ids) if j == i]) for i in range(4)}
    assert all(len(v) for v in by_env.values()), {i: len(v) for i, v in by_env.items()}
    warm = torch.cat([by_env[0], by_env[1]]).mean().item()
    cold = torch.cat([by_env[2], by_env[3]]).mean().item()
    assert abs(warm - np.log(1 / 7)) < 0.1, warm  # a fresh network is near uniform over the 7 actions
    assert cold > warm + 0.5, (warm, cold)
    assert all(np.isfinite(m['losses/policy']) and 0 <= m['ppo/clip_frac'] <= 1 for m in w.metrics)
