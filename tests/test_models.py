"""Heavier checks of the actor-critic networks: independent step-by-step references, full-size models, replay."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mario_a3c.bench_model import bench_one, format_bench
from mario_a3c.cores import CORES, RNNCore, TransformerCore
from mario_a3c.models import (
    ImpalaActorCritic,
    batch_state,
    count_parameters,
    detach_state,
    expected_parameter_count,
    index_state,
)
from mario_a3c.noisy import NoisyLinear

SMALL = dict(
    in_channels=2, obs_size=16, channels=(4, 8), blocks=1, hidden=32, core_size=16, window=3, heads=2
)


def _starts(T, B, p=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(T, B, generator=g) < p
    s[0] = True
    return s


# ---------------------------------------------------------------- independent references for the cores


def _rnn_reference(core: RNNCore, x, starts):
    "Step-by-step cells per layer, zeroing the state of envs that start an episode."
    rnn, lstm = core.rnn, core.kind == 'lstm'
    L, H = rnn.num_layers, rnn.hidden_size
    cells = []
    for l in range(L):
        cell = (nn.LSTMCell if lstm else nn.GRUCell)(rnn.input_size if l == 0 else H, H)
        with torch.no_grad():
            for name in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'):
                getattr(cell, name).copy_(getattr(rnn, f'{name}_l{l}'))
        cells.append(cell)
    B = x.shape[1]
    h = [torch.zeros(B, H) for _ in range(L)]
    c = [torch.zeros(B, H) for _ in range(L)]
    ys = []
    for t in range(x.shape[0]):
        keep = (~starts[t]).float()[:, None]
        inp = x[t]
        for l in range(L):
            h[l], c[l] = h[l] * keep, c[l] * keep
            if lstm:
                h[l], c[l] = cells[l](inp, (h[l], c[l]))
            else:
                h[l] = cells[l](inp, h[l])
            inp = h[l]
        ys.append(inp)
    return torch.stack(ys)


def _transformer_reference(core: TransformerCore, x, starts):
    "Per env, per step: attend over explicit lists of the episode's past layer inputs (at most `window`)."
    W, T, B = core.window, x.shape[0], x.shape[1]
    out = torch.zeros(T, B, core.out_size)
    for b in range(B):
        hist = [[] for _ in core.blocks]  # per layer: inputs of this episode so far
        for t in range(T):
            if starts[t, b]:
                hist = [[] for _ in core.blocks]
            h = core.inp(x[t, b])
            for l, blk in enumerate(core.blocks):
                keys = hist[l][-W:] + [h]
                hist[l].append(h)
                nh, D = blk.heads, h.shape[-1]
                dh = D // nh
                q = blk.qkv(blk.norm1(h))[:D].view(nh, dh)
                kv = blk.qkv(blk.norm1(torch.stack(keys)))  # [n, 3D]
                k, v = kv[:, D : 2 * D].view(-1, nh, dh), kv[:, 2 * D :].view(-1, nh, dh)
                heads = []
                for i in range(nh):
                    dist = torch.arange(len(keys) - 1, -1, -1)
                    score = (k[:, i] @ q[i]) / math.sqrt(dh) + blk.rel_bias[i, dist]
                    heads.append(score.softmax(0) @ v[:, i])
                h = h + blk.proj(torch.cat(heads))
                h = h + blk.mlp(blk.norm2(h))
            out[t, b] = core.norm(h)
    return out


@pytest.mark.parametrize('kind,layers', [('gru', 1), ('lstm', 1), ('gru', 2), ('lstm', 2)])
def test_rnn_core_matches_cells(kind, layers):
    torch.manual_seed(0)
    core = RNNCore(kind, 6, 5, layers)
    x, starts = torch.randn(17, 4, 6), _starts(17, 4)
    with torch.no_grad():
        y, _ = core(x, core.initial_state(4), starts)
        torch.testing.assert_close(y, _rnn_reference(core, x, starts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layers,window', [(1, 3), (2, 4), (1, 1)])
def test_transformer_core_matches_reference(layers, window):
    torch.manual_seed(1)
    core = TransformerCore(6, d_model=8, window=window, heads=2, layers=layers)
    with torch.no_grad():
        for blk in core.blocks:
            blk.rel_bias.normal_()  # make the position bias matter
        x, starts = torch.randn(13, 3, 6), _starts(13, 3, p=0.2, seed=2)
        # split into uneven chunks to exercise the memory across calls
        st, ys = core.initial_state(3), []
        for a, b in [(0, 5), (5, 6), (6, 13)]:
            y, st = core(x[a:b], st, starts[a:b])
            ys.append(y)
        torch.testing.assert_close(
            torch.cat(ys), _transformer_reference(core, x, starts), rtol=1e-5, atol=1e-5
        )


# ---------------------------------------------------------------- the full-size model


@pytest.mark.parametrize('core', CORES)
def test_default_model_chunked_equals_stepwise(core):
    torch.manual_seed(0)
    m = ImpalaActorCritic(7, core=core, window=4).eval()
    T, B = 6, 2
    obs = torch.randint(0, 256, (T, B, 4, 84, 84), dtype=torch.uint8)
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[0] = True
    starts[3, 0] = True
    with torch.no_grad():
        lg, v, s = m(obs, m.initial_state(B), starts)
        st = m.initial_state(B)
        for t in range(T):
            a, lp, vt, st = m.act(obs[t], st, starts[t], deterministic=True)
            torch.testing.assert_close(vt, v[t], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a, lg[t].argmax(-1))
            torch.testing.assert_close(lp, lg[t].log_softmax(-1).max(-1).values, rtol=1e-4, atol=1e-4)
        for x, y in zip(st, s):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_replay_from_stored_state_reproduces_rollout():
    "The trainer's flow: act step by step, store the state at the rollout start, replay the rollout with gradient."
    torch.manual_seed(0)
    m = ImpalaActorCritic(5, core='lstm', **SMALL)
    T, B = 6, 3
    obs = torch.randint(0, 256, (2 * T, B, 2, 16, 16), dtype=torch.uint8)
    starts = _starts(2 * T, B, p=0.2)
    st, stored, acted = m.initial_state(B), [], []
    for t in range(2 * T):
        if t % T == 0:
            stored.append(detach_state(st))
        _, logp, v, st = m.act(obs[t], st, starts[t], deterministic=True)
        acted.append(v)
    # replay the second rollout of env 1 only, from its stored state
    lg, v, _ = m(obs[T:, 1:2], index_state(stored[1], 1), starts[T:, 1:2])
    torch.testing.assert_close(v[:, 0], torch.stack(acted[T:])[:, 1], rtol=1e-5, atol=1e-5)
    v.sum().backward()
    assert m.backbone.fc.weight.grad is not None


@pytest.mark.parametrize('core', CORES)
@pytest.mark.parametrize('noisy', [False, True])
def test_parameter_count_grid(core, noisy):
    for kw in [
        dict(),
        dict(channels=(16, 32, 32, 32), obs_size=96, blocks=3, hidden=512, core_size=128, heads=8, window=8),
        dict(channels=(8,), obs_size=7 + 2, in_channels=1, blocks=0, core_layers=3),
    ]:
        m = ImpalaActorCritic(12, core=core, noisy=noisy, **kw)
        assert count_parameters(m) == expected_parameter_count(12, core=core, noisy=noisy, **kw)


def test_validation_messages():
    for kw, msg in [
        (dict(core='rnn'), 'core must be one of'),
        (dict(channels=()), 'channels must be a non-empty'),
        (dict(channels=(16, 0)), 'channels must be a non-empty'),
        (dict(obs_size=4), 'obs_size=4 is too small'),
        (dict(blocks=-1), 'blocks must be >= 0'),
        (dict(core='transformer', window=0), 'window must be >= 1'),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            ImpalaActorCritic(7, **kw)
        assert '\n' not in str(e.value)
    m = ImpalaActorCritic(7, core='none', **dict(SMALL, in_channels=4))
    with pytest.raises(ValueError, match='obs must be uint8'):
        m(torch.zeros(1, 2, 4, 17, 16, dtype=torch.uint8), (), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match='episode_start must be'):
        m(torch.zeros(1, 2, 4, 16, 16, dtype=torch.uint8), (), torch.zeros(2, 1, dtype=torch.bool))


@pytest.mark.parametrize('core', CORES)
def test_gradients_default_size(core):
    torch.manual_seed(0)
    m = ImpalaActorCritic(7, core=core, noisy=True, window=2)
    obs = torch.randint(0, 256, (4, 2, 4, 84, 84), dtype=torch.uint8)
    lg, v, _ = m(obs, m.initial_state(2), torch.zeros(4, 2, dtype=torch.bool))
    (lg.log_softmax(-1)[..., 1].sum() + v.square().sum()).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_state_helpers_all_cores():
    for core in CORES:
        m = ImpalaActorCritic(5, core=core, **SMALL)
        s = m.initial_state(4)
        mask = torch.tensor([True, False, True, False])
        picked = index_state(s, mask)
        assert all(x.shape[1] == 2 for x in picked)
        back = batch_state([index_state(s, i) for i in range(4)])
        assert all(torch.equal(a, b) for a, b in zip(back, s))


# ---------------------------------------------------------------- NoisyLinear, more draws than the notebook


def test_noisy_linear_statistics_large():
    g = torch.Generator().manual_seed(3)
    lin = NoisyLinear(32, 16)
    draws = []
    for _ in range(3000):
        lin.reset_noise(g)
        draws.append(((lin.weight_and_bias()[0] - lin.weight_mu) / lin.weight_sigma).detach())
    z = torch.stack(draws)  # [n, q, p]
    # entries of one draw are products of shared factors: check the pooled moments
    assert abs(z.mean().item()) < 0.02
    assert abs(z.var(0).mean().item() - 2 / math.pi) < 0.02
    lin.eval()
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight_mu, lin.bias_mu))


def test_bench_one_smoke():
    r = bench_one(core='transformer', infer_batch=2, train_T=2, train_B=2, rounds=1, infer_calls=1, **SMALL)
    assert 'error' not in r and r['train_ms'] > 0
    assert '| transformer | NHWC | off |' in format_bench([r])


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('core', CORES)
def test_cuda_matches_cpu(core):
    import copy

    torch.manual_seed(0)
    T, B = 6, 3
    m = ImpalaActorCritic(7, core=core, noisy=True, window=4)
    mc = copy.deepcopy(m).cuda()
    obs = torch.randint(0, 256, (T, B, 4, 84, 84), dtype=torch.uint8)
    starts = _starts(T, B, p=0.3)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        # training mode: the same noise buffers on both devices, gradients everywhere on the GPU
        lg, v, s = m(obs, m.initial_state(B), starts)
        lgc, vc, sc = mc(obs.cuda(), mc.initial_state(B, 'cuda'), starts.cuda())
        torch.testing.assert_close(lgc.cpu(), lg, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vc.cpu(), v, rtol=1e-4, atol=1e-4)
        for x, y in zip(sc, s):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-4)
        (lgc.log_softmax(-1)[..., 0].sum() + vc.square().sum()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mc.parameters())
        mc.reset_noise()
        assert mc.policy.eps_in.is_cuda
        # eval mode: stepping with act from per-env state slices (non-contiguous) equals one call
        mc.eval()
        with torch.no_grad():
            lg, v, s = mc(obs.cuda(), mc.initial_state(B, 'cuda'), starts.cuda())
            st = [index_state(mc.initial_state(B, 'cuda'), b) for b in range(B)]
            for t in range(T):
                outs = [
                    mc.act(obs[t, b : b + 1].cuda(), st[b], starts[t, b : b + 1].cuda(), deterministic=True)
                    for b in range(B)
                ]
                st = [o[3] for o in outs]
                torch.testing.assert_close(torch.cat([o[2] for o in outs]), v[t], rtol=1e-4, atol=1e-4)
            for x, y in zip(batch_state(st), s):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
            a, *_ = mc.act(
                obs[0].cuda(),
                mc.initial_state(B, 'cuda'),
                starts[0].cuda(),
                generator=torch.Generator('cuda').manual_seed(0),
            )
            assert a.is_cuda and a.shape == (B,)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
