"""Rollout collection: the SameStep episode boundary, carried state, episode stats once per episode, env failures."""

import os
import signal

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from mario_a3c.models import ImpalaActorCritic
from mario_a3c.testing import CountingEnv
from mario_a3c.rollout import EnvFailure, Rollout, check_batch, collect, finished_episodes, vec_step
from mario_a3c.segments import collate_segments
from mario_a3c.vector import make_vec_env


class CounterPolicy:
    "Stub actor: the state counts steps since the episode start; action = count % 3, value = count."

    def initial_state(self, B):
        return (torch.zeros(1, B),)

    def act(self, obs, state, episode_start, generator=None):
        n = torch.where(episode_start, 0.0, state[0][0]) + 1
        return (n % 3).long(), torch.full_like(n, -1.0), n, (n[None],)


def counting_envs(n=3, length=4, mode='SameStep', size=4, **kw):
    return SyncVectorEnv(
        [lambda: CountingEnv(length=length, size=size, **kw)] * n, autoreset_mode=AutoresetMode(mode)
    )


def collect_many(envs, policy, n_rollouts, T, seed=0):
    o, _ = envs.reset(seed=seed)
    B = o.shape[0]
    state, obs, start = policy.initial_state(B), torch.from_numpy(o), torch.ones(B, dtype=torch.bool)
    out = []
    for _ in range(n_rollouts):
        c = collect(envs, policy, state, obs, start, T)
        state, obs, start = c.state, c.obs, c.episode_start
        out.append(c)
    return out


@pytest.mark.parametrize("T", [1, 4, 5, 7])
def test_same_step_boundary(T):
    envs = counting_envs(n=3, length=4)
    cs = collect_many(envs, CounterPolicy(), n_rollouts=12 // T + 2, T=T)
    envs.close()
    total_dones = 0
    for c in cs:
        r = c.rollout
        assert check_batch(r) == (T, 3)
        step = r.obs[:, :, 0, 0, 0].long()  # steps into the episode, written by the env into the frame
        episode = r.obs[:, :, 1, 0, 0].long()
        assert torch.equal(r.episode_start, step == 0)
        assert torch.equal(r.dones, r.episode_start[1:])
        assert torch.equal(r.rewards, (step[:-1] + 1).float())  # real rewards only: never a fake 0
        assert (r.rewards > 0).all()
        nxt = torch.where(r.dones, episode[1:] - episode[:-1], step[1:] - step[:-1])
        assert (nxt == 1).all()
        assert torch.equal(r.values, (step[:-1] + 1).float())  # policy state reset exactly at starts
        total_dones += int(r.dones.sum())
    for a, b in zip(cs[:-1], cs[1:]):
        assert torch.equal(a.rollout.obs[-1], b.rollout.obs[0])
        assert torch.equal(a.rollout.episode_start[-1], b.rollout.episode_start[0])
        assert torch.equal(a.state[0], b.rollout.init_state[0])
    assert total_dones == sum(len(c.episodes) for c in cs) > 0


def test_episode_stats_once_per_episode():
    envs = counting_envs(n=3, length=3)
    cs = collect_many(envs, CounterPolicy(), n_rollouts=5, T=4)
    envs.close()
    acc, ref = {}, []
    for c in cs:
        r = c.rollout
        for t in range(r.T):
            for b in range(r.B):
                if r.episode_start[t, b]:
                    acc[b] = [0.0, 0]
                if b in acc:
                    acc[b][0] += float(r.rewards[t, b])
                    acc[b][1] += 1
                if r.dones[t, b] and b in acc:
                    ref.append((b, acc.pop(b)))
    emitted = [(e['env'], [e['r'], e['l']]) for c in cs for e in c.episodes]
    assert sorted(emitted) == sorted(ref)
    assert all(not k.startswith('_') for c in cs for e in c.episodes for k in e)


def test_next_step_is_refused_and_would_fake_a_transition():
    envs = counting_envs(n=1, length=3, mode='NextStep')
    envs.reset(seed=0)
    rewards = [float(envs.step(np.zeros(1, np.int64))[1][0]) for _ in range(4)]
    assert rewards == [1.0, 2.0, 3.0, 0.0]  # NextStep's reset step: reward 0, action ignored
    with pytest.raises(ValueError, match="'NextStep': collect needs 'SameStep'"):
        collect(
            envs,
            CounterPolicy(),
            (torch.zeros(1, 1),),
            torch.zeros(1, 2, 4, 4, dtype=torch.uint8),
            torch.ones(1, dtype=torch.bool),
            3,
        )
    envs.close()


@pytest.mark.parametrize("core", ["lstm", "gru", "transformer", "none"])
def test_learner_forward_reproduces_acting(core):
    torch.manual_seed(0)
    model = ImpalaActorCritic(
        7,
        in_channels=4,
        obs_size=16,
        channels=(4, 8),
        blocks=1,
        hidden=32,
        core=core,
        core_size=16,
        window=3,
        heads=2,
    )
    envs = counting_envs(n=3, length=3, size=16)
    o, _ = envs.reset(seed=0)
    state, obs, start = model.initial_state(3), torch.from_numpy(o), torch.ones(3, dtype=torch.bool)
    for _ in range(3):
        c = collect(envs, model, state, obs, start, T=5)
        state, obs, start = c.state, c.obs, c.episode_start
    envs.close()
    r = c.rollout
    logits, values, final = model(r.obs[:-1], r.init_state, r.episode_start[:-1])
    logp = logits.log_softmax(-1).gather(-1, r.actions[..., None])[..., 0]
    torch.testing.assert_close(logp, r.behaviour_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, r.values, rtol=1e-5, atol=1e-5)
    for a, b in zip(final, c.state):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    assert not any(s.is_inference() for s in r.init_state)


def test_segments_roundtrip():
    envs = counting_envs(n=2, length=3, size=16)
    model = ImpalaActorCritic(7, obs_size=16, channels=(4,), blocks=1, hidden=8, core='gru', core_size=4)
    o, _ = envs.reset(seed=0)
    c = collect(
        envs, model, model.initial_state(2), torch.from_numpy(o), torch.ones(2, dtype=torch.bool), T=4
    )
    envs.close()
    back = collate_segments(c.rollout.segments())
    assert all(torch.equal(x, y) for x, y in zip(back[:6], c.rollout[:6]))
    assert torch.equal(back.init_state[0], c.rollout.init_state[0])


def test_check_batch_errors():
    r = Rollout(
        torch.zeros(4, 2, 2, 4, 4, dtype=torch.uint8),
        torch.zeros(3, 2, dtype=torch.long),
        torch.zeros(3, 2),
        torch.zeros(3, 2),
        torch.zeros(3, 2, dtype=torch.bool),
        torch.zeros(4, 2, dtype=torch.bool),
        (),
        torch.zeros(3, 2),
    )
    assert check_batch(r) == (3, 2)
    with pytest.raises(ValueError, match=r"episode_start has shape \(3, 2\), expected \(4, 2\)"):
        check_batch(r._replace(episode_start=torch.zeros(3, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="init_state must have batch 2"):
        check_batch(r._replace(init_state=(torch.zeros(1, 3, 4),)))


def test_raising_worker_is_env_failure():
    envs = counting_envs(n=2, fail_at=3)
    envs.reset(seed=0)
    for _ in range(2):
        vec_step(envs, np.zeros(2, np.int64))
    with pytest.raises(EnvFailure, match="RuntimeError: scripted failure at step 3"):
        vec_step(envs, np.zeros(2, np.int64))
    envs.close()


def test_hung_worker_times_out():
    envs = make_vec_env(2, 'async', env_fn=CountingEnv, size=4, hang_at=2)
    envs.reset(seed=0)
    vec_step(envs, np.zeros(2, np.int64), timeout=10)
    with pytest.raises(
        EnvFailure, match=r"TimeoutError.* within 0\.5 s"
    ):  # the wait's own limit, not the env's hour
        vec_step(envs, np.zeros(2, np.int64), timeout=0.5)
    envs.close(terminate=True)
    assert not any(p.is_alive() for p in envs.processes)  # the hung worker was ended


def test_killed_worker_is_env_failure():
    envs = make_vec_env(2, 'async', env_fn=CountingEnv, size=4)
    envs.reset(seed=0)
    vec_step(envs, np.zeros(2, np.int64), timeout=10)
    os.kill(envs.processes[-1].pid, signal.SIGKILL)
    envs.processes[-1].join(5)
    with pytest.raises(EnvFailure):
        vec_step(envs, np.zeros(2, np.int64), timeout=10)
    envs.close(terminate=True)


def test_finished_episodes_plain_dict():
    envs = counting_envs(n=2, length=2)
    envs.reset(seed=0)
    out = [finished_episodes(envs.step(np.zeros(2, np.int64))[4]) for _ in range(3)]
    envs.close()
    assert out[0] == []
    assert out[1] == [
        {
            'env': 0,
            'r': 3.0,
            'native_r': 3.0,
            'l': 2,
            'x': 20,
            'flag': False,
            'world': 1,
            'stage': 1,
            't': 0.0,
        }
    ]
    assert isinstance(out[1][0]['l'], int) and isinstance(out[1][0]['flag'], bool)
