"""Learner: loss against element-wise references, replay weights, grad accumulation, NaN skips, AMP and compile tolerances."""

import copy
import io
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mario_a3c.learner import (
    Learner,
    ReplayMix,
    amp_dtype,
    cat_batches,
    compute_loss,
    loss_and_grads,
    relative_error,
)
from mario_a3c.models import ImpalaActorCritic
from mario_a3c.replay import PrioritizedReplay
from mario_a3c.rollout import Rollout

CORES = ['lstm', 'gru', 'transformer', 'none']
CFG = SimpleNamespace(
    returns='vtrace',
    gamma=0.9,
    gae_lambda=0.95,
    rho_bar=1.0,
    c_bar=1.0,
    entropy_beta=0.01,
    uniform_kl_beta=0.0,
    value_coef=0.5,
    ppo_clip=0.0,
    adv_norm=False,
)
# Tolerances: bfloat16/float16 keep 8/11 mantissa bits -> loss within 2 %, gradient vector within 15 % relative error
# (the CNN's weight gradients, sums of many products, came out 8-13 % off per conv layer in bfloat16, the whole
# vector 1-8 % over 5 seeds; see 07_learner);
# compilation reorders float32 arithmetic only -> 1e-4.
AMP_LOSS_RTOL, AMP_GRAD_RTOL, COMPILE_RTOL = 0.02, 0.15, 1e-4


def tiny_model(core='lstm', seed=0, n_actions=5, size=12, device='cpu'):
    torch.manual_seed(seed)
    return ImpalaActorCritic(
        n_actions,
        in_channels=2,
        obs_size=size,
        channels=(4, 8),
        blocks=1,
        hidden=16,
        core=core,
        core_size=8,
        window=4,
        heads=2,
    ).to(device)


def random_batch(model, T=6, B=4, seed=0, p_done=0.25):
    g = torch.Generator().manual_seed(seed)
    A, S = model.n_actions, model.obs_size
    dones = torch.rand(T, B, generator=g) < p_done
    starts = torch.cat([torch.rand(1, B, generator=g) < 0.5, dones])
    state = tuple(
        torch.randn(s.shape, generator=g).to(s.dtype) if s.is_floating_point() else s
        for s in model.initial_state(B)
    )
    return Rollout(
        torch.randint(0, 256, (T + 1, B, 2, S, S), generator=g, dtype=torch.uint8),
        torch.randint(0, A, (T, B), generator=g),
        -math.log(A) + 0.5 * torch.randn(T, B, generator=g),
        torch.randn(T, B, generator=g),
        dones,
        starts,
        state,
        torch.zeros(T, B),
    )


def config(**kw):
    base = dict(
        vars(CFG),
        lr=1e-3,
        weight_decay=0.0,
        adam_eps=1e-5,
        warmup_updates=2,
        total_updates=10,
        lr_floor=0.1,
        grad_accum=1,
        clip_grad=40.0,
        amp=False,
        compile=False,
        per_batch=2,
        per_warmup=2,
        per_beta=0.4,
        epochs=1,
        minibatches=1,
    )
    return SimpleNamespace(**{**base, **kw})


def column(r, b):
    return Rollout(
        *(x[:, b : b + 1] for x in r[:6]),
        tuple(s[:, b : b + 1] for s in r.init_state),
        r.values[:, b : b + 1],
    )


def reference_vtrace_loss(model, batch, cfg):
    "Per column, in Python floats: IMPALA eq. 1 targets, then the three loss terms."
    T, B = batch.actions.shape
    pg = v_loss = ent = 0.0
    for b in range(B):
        st = tuple(s[:, b : b + 1] for s in batch.init_state)
        with torch.no_grad():
            logits, V, _ = model(batch.obs[:, b : b + 1], st, batch.episode_start[:, b : b + 1])
            p = torch.softmax(logits[:, 0].double(), -1)
        lp = [math.log(p[t, batch.actions[t, b]]) for t in range(T)]
        rho = [math.exp(lp[t] - batch.behaviour_logp[t, b].item()) for t in range(T)]
        v = V[:, 0].double().tolist()
        r = batch.rewards[:, b].tolist()
        d = [cfg.gamma * (1 - float(batch.dones[t, b])) for t in range(T)]
        vs = []
        for s in range(T):
            acc = v[s]
            for t in range(s, T):
                c = math.prod(d[i] * min(cfg.c_bar, rho[i]) for i in range(s, t))
                acc += c * min(cfg.rho_bar, rho[t]) * (r[t] + d[t] * v[t + 1] - v[t])
            vs.append(acc)
        vs.append(v[T])
        pg += sum(-min(cfg.rho_bar, rho[t]) * (r[t] + d[t] * vs[t + 1] - v[t]) * lp[t] for t in range(T))
        v_loss += sum(0.5 * (v[t] - vs[t]) ** 2 for t in range(T))
        ent += sum(-(p[t] * p[t].log()).sum().item() for t in range(T))
    n = T * B
    return pg / n + cfg.value_coef * v_loss / n - cfg.entropy_beta * ent / n


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("clips", [(1.0, 1.0), (2.0, 0.5)])
def test_vtrace_loss_matches_reference(core, clips):
    model = tiny_model(core)
    batch = random_batch(model, seed=hash(core) % 100)
    cfg = SimpleNamespace(**{**vars(CFG), 'rho_bar': clips[0], 'c_bar': clips[1]})
    loss, m = compute_loss(model, batch, cfg)
    assert loss.item() == pytest.approx(reference_vtrace_loss(model, batch, cfg), rel=1e-5, abs=1e-6)
    assert m['td_abs'].shape == (4,)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 3.0])
def test_gae_policy_term_is_clipped_ratio_times_gae(ratio):
    model = tiny_model('gru')
    batch = random_batch(model, seed=4)
    cfg = SimpleNamespace(
        **{**vars(CFG), 'returns': 'gae', 'entropy_beta': 0.0, 'value_coef': 0.0, 'rho_bar': 2.0}
    )
    with torch.no_grad():
        logits, V, _ = model(batch.obs, batch.init_state, batch.episode_start)
        own = logits[:-1].log_softmax(-1).gather(-1, batch.actions[..., None])[..., 0]
    loss, _ = compute_loss(model, batch._replace(behaviour_logp=own - math.log(ratio)), cfg)
    T, B = batch.actions.shape
    total = 0.0
    for b in range(B):
        A = 0.0
        for t in reversed(range(T)):
            d = cfg.gamma * (1 - float(batch.dones[t, b]))
            A = batch.rewards[t, b].item() + d * V[t + 1, b].item() - V[t, b].item() + d * cfg.gae_lambda * A
            total += -min(cfg.rho_bar, ratio) * A * own[t, b].item()
    assert loss.item() == pytest.approx(total / (T * B), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("returns", ["vtrace", "gae"])
def test_replay_weights_scale_columns(returns):
    model = tiny_model()
    batch = random_batch(model, seed=2)
    cfg = SimpleNamespace(**{**vars(CFG), 'returns': returns})
    w = torch.tensor([1.0, 0.2, 0.7, 0.05])
    lw, _ = compute_loss(model, batch, cfg, weights=w)
    hand = sum(w[b].item() * compute_loss(model, column(batch, b), cfg)[0].item() for b in range(4)) / 4
    assert lw.item() == pytest.approx(hand, rel=1e-5, abs=1e-7)


def test_bad_inputs():
    model = tiny_model()
    batch = random_batch(model)
    with pytest.raises(ValueError, match="returns='td': allowed vtrace, gae"):
        compute_loss(model, batch, SimpleNamespace(**{**vars(CFG), 'returns': 'td'}))
    with pytest.raises(ValueError, match=r"weights must have shape \[B\]=\(4,\)"):
        compute_loss(model, batch, CFG, weights=torch.ones(2))
    with pytest.raises(ValueError, match="different T: 6 and 5"):
        cat_batches(batch, random_batch(model, T=5))


@pytest.mark.parametrize("returns", ["vtrace", "gae"])
def test_grad_accumulation_equals_full_batch(returns):
    big = random_batch(tiny_model(), T=5, B=4, seed=3)
    full = Learner(tiny_model(), config(returns=returns))
    acc = Learner(tiny_model(), config(returns=returns, grad_accum=2))
    o_full = full.update([big])
    halves = [
        Rollout(
            *(x[:, b0 : b0 + 2] for x in big[:6]),
            tuple(s[:, b0 : b0 + 2] for s in big.init_state),
            big.values[:, b0 : b0 + 2],
        )
        for b0 in (0, 2)
    ]
    o_acc = acc.update(halves)
    assert o_acc['opt/grad_norm'] == pytest.approx(o_full['opt/grad_norm'], rel=1e-5)
    for p, q in zip(full.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_first_adam_step_by_hand():
    model = tiny_model()
    batch = random_batch(model)
    _, g = loss_and_grads(model, batch, CFG)
    L = Learner(model, config(clip_grad=0.0))
    p0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    out = L.update([batch])
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - p0
    assert out['opt/lr'] == 1e-3 / 2
    assert out['opt/grad_norm'] == pytest.approx(g.norm().item(), rel=1e-5)
    torch.testing.assert_close(step, -5e-4 * g / (g.abs() + 1e-5), rtol=0, atol=1e-7)


def test_clipping_limits_the_step():
    model = tiny_model()
    batch = random_batch(model)._replace(rewards=100 * torch.ones(6, 4))
    _, g = loss_and_grads(model, batch, CFG)
    L = Learner(model, config(clip_grad=0.01))
    p0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    out = L.update([batch])
    assert out['opt/grad_norm'] == pytest.approx(g.norm().item(), rel=1e-5)  # reported before clipping
    assert g.norm() > 1  # so clipping to 0.01 matters
    gc = g * (0.01 / g.norm())
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - p0
    torch.testing.assert_close(
        step, -5e-4 * gc / (gc.abs() + 1e-5), rtol=0, atol=1e-7
    )  # Adam's first step on gc


def test_nan_loss_is_skipped_and_counted():
    L = Learner(tiny_model(), config())
    batch = random_batch(L.model)
    L.update([batch])
    before = copy.deepcopy((L.model.state_dict(), L.opt.state_dict(), L.sched.state_dict()))
    bad = batch._replace(rewards=torch.full((6, 4), float('nan')))
    for k in range(3):
        out = L.update([bad])
        assert out['opt/skipped'] == 1.0 and L.nan_streak == k + 1
    for k, v in before[0].items():
        assert torch.equal(v, L.model.state_dict()[k])
    assert L.opt.state_dict()['state'][0]['step'] == before[1]['state'][0]['step']
    assert L.sched.last_epoch == before[2]['last_epoch']
    L.update([batch])
    assert (L.nan_streak, L.nan_skips, L.steps) == (0, 3, 2)


def test_nan_in_one_accumulated_rollout_skips_the_step():
    L = Learner(tiny_model(), config(grad_accum=2))
    batch = random_batch(L.model)
    before = copy.deepcopy(L.model.state_dict())
    assert L.update([batch, batch._replace(rewards=torch.full((6, 4), float('inf')))])['opt/skipped'] == 1.0
    for k, v in before.items():
        assert torch.equal(v, L.model.state_dict()[k])


def test_hybrid_replay_priorities_and_storage():
    L = Learner(tiny_model(), config(per_batch=2, per_warmup=4))
    replay = PrioritizedReplay(16, alpha=1.0, seed=0)
    r1, r2 = random_batch(L.model, seed=5), random_batch(L.model, seed=6)
    _, m_before = compute_loss(L.model, r1, L.config)
    mix = ReplayMix(L.config, replay)
    L.update([r1], mix)
    assert len(replay) == 4  # fresh segments stored with their TD errors
    np.testing.assert_allclose(
        replay.tree[np.arange(4)] - replay.eps, m_before['td_abs'].numpy(), rtol=1e-5, atol=1e-6
    )
    _, m_ref = compute_loss(L.model, r1, L.config)  # after the step: what the replayed ones must get
    replay.rng = np.random.default_rng(1)
    idx, _, w = replay.sample(2, 0.4)
    replay.rng = np.random.default_rng(1)
    m = L.update([r2], mix)
    np.testing.assert_allclose(
        replay.tree[idx] - replay.eps, m_ref['td_abs'][idx].numpy(), rtol=1e-4, atol=1e-6
    )
    assert m['replay/mean_weight'] == pytest.approx(float(w.mean()), rel=1e-6)
    assert len(replay) == 8


@pytest.mark.parametrize("core", CORES)
def test_replayed_columns_reevaluate_like_originals(core):
    model = tiny_model(core)
    ra, rb = random_batch(model, B=3, seed=1), random_batch(model, B=2, seed=2)
    replay = PrioritizedReplay(8, seed=0)
    for s in rb.segments():
        replay.add(s)
    idx, seg, _ = replay.sample(2, 0.4)
    both = cat_batches(ra, seg)
    assert [s.dtype for s in both.init_state] == [s.dtype for s in ra.init_state]
    _, mc = compute_loss(model, both, CFG)
    _, mb = compute_loss(model, rb, CFG)
    torch.testing.assert_close(mc['td_abs'][3:], mb['td_abs'][torch.from_numpy(idx)], rtol=1e-5, atol=1e-5)


def test_state_dict_roundtrip_continues_identically():
    batch = random_batch(tiny_model())
    a = Learner(tiny_model(), config())
    for _ in range(2):
        a.update([batch])
    b = Learner(tiny_model(seed=9), config())
    b.model.load_state_dict(a.model.state_dict())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as in a checkpoint: plain types, weights_only loads it
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    oa, ob = a.update([batch]), b.update([batch])
    assert oa['opt/lr'] == ob['opt/lr']
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_amp_dtype_rules():
    assert amp_dtype(False, 'cpu') is None
    assert amp_dtype(True, 'cuda') == torch.float16
    assert amp_dtype(True, 'cpu', force=True) == torch.bfloat16


@pytest.mark.parametrize("core", CORES)
def test_bf16_autocast_close_to_fp32(core):
    model = tiny_model(core)
    batch = random_batch(model)
    l32, g32 = loss_and_grads(model, batch, CFG)
    lbf, gbf = loss_and_grads(model, batch, CFG, amp=torch.bfloat16)
    assert lbf == pytest.approx(l32, rel=AMP_LOSS_RTOL)
    assert relative_error(gbf, g32) < AMP_GRAD_RTOL


def test_learner_with_forced_bf16_steps_close_to_fp32():
    batch = random_batch(tiny_model())
    a, b = Learner(tiny_model(), config()), Learner(tiny_model(), config(amp=True), force_amp=True)
    assert b.amp_dtype == torch.bfloat16
    oa, ob = a.update([batch]), b.update([batch])
    assert ob['losses/total'] == pytest.approx(oa['losses/total'], rel=AMP_LOSS_RTOL)
    assert ob['opt/grad_norm'] == pytest.approx(oa['opt/grad_norm'], rel=AMP_GRAD_RTOL)


@pytest.mark.skipif(
    shutil.which('g++') is None and shutil.which('c++') is None,
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compile_close_to_eager():
    model = tiny_model('lstm')
    batch = random_batch(model)
    l32, g32 = loss_and_grads(model, batch, CFG)
    lc, gc = loss_and_grads(model, batch, CFG, forward=torch.compile(model))
    assert lc == pytest.approx(l32, rel=COMPILE_RTOL)
    assert relative_error(gc, g32) < COMPILE_RTOL


def test_compile_failure_falls_back_with_one_line():
    import torch._inductor.config as inductor_config

    notes, old = [], (inductor_config.cpp.cxx, inductor_config.force_disable_caches)
    inductor_config.cpp.cxx, inductor_config.force_disable_caches = ('/nonexistent/c++',), True
    try:
        torch._dynamo.reset()
        lc = Learner(tiny_model(), config(compile=True), log=notes.append)
        oc = lc.update([random_batch(lc.model)])
    finally:
        inductor_config.cpp.cxx, inductor_config.force_disable_caches = old
        torch._dynamo.reset()
    le = Learner(tiny_model(), config())
    oe = le.update([random_batch(le.model)])
    assert notes[0].startswith('torch.compile: the first update compiles the model')  # said before the wait
    assert len(notes) == 2 and notes[1].startswith('torch.compile unavailable (') and '\n' not in notes[1]
    assert lc.compile_state == 'off'
    assert oc['losses/total'] == pytest.approx(oe['losses/total'], rel=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_and_compile_close_to_fp32():
    model = tiny_model('lstm', device='cuda')
    batch = random_batch(model).to('cuda')
    l32, g32 = loss_and_grads(model, batch, CFG)
    l16, g16 = loss_and_grads(model, batch, CFG, amp=torch.float16)
    lc, gc = loss_and_grads(model, batch, CFG, forward=torch.compile(model))
    assert l16 == pytest.approx(l32, rel=AMP_LOSS_RTOL) and relative_error(g16, g32) < AMP_GRAD_RTOL
    assert lc == pytest.approx(l32, rel=COMPILE_RTOL) and relative_error(gc, g32) < COMPILE_RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_learner_with_grad_scaler():
    L = Learner(tiny_model(device='cuda'), config(amp=True), device='cuda')
    assert L.scaler.is_enabled() and L.amp_dtype == torch.float16
    batch = random_batch(L.model)
    for _ in range(3):
        out = L.update([batch])
    assert 'opt/amp_scale' in out and L.steps + L.scaler_skips == 3 and L.nan_skips == 0


def test_an_update_takes_the_rollouts_of_its_recipe():
    "grad_accum rollouts, or one to reuse; anything else is refused before a gradient is computed."
    L = Learner(tiny_model(), config(grad_accum=2))
    batch = random_batch(L.model)
    with pytest.raises(ValueError, match=r"an update takes 2 rollout\(s\), got 1"):
        L.update([batch])
    assert all(p.grad is None for p in L.model.parameters()) and L.steps == 0
    with pytest.raises(ValueError, match="grad_accum=2 with epochs/minibatches"):
        Learner(tiny_model(), config(grad_accum=2, epochs=2)).update([batch])
    with pytest.raises(ValueError, match="minibatches=3 does not divide the rollout's 4 envs"):
        Learner(tiny_model(), config(minibatches=3)).update([batch])


def test_reuse_stores_fresh_segments_once_and_replays_on_the_first_pass_only():
    replay = PrioritizedReplay(16, alpha=1.0, seed=0)
    cfg = config(epochs=3, minibatches=2, per_warmup=2, per_batch=2)
    L = Learner(tiny_model(), cfg)
    mix = ReplayMix(cfg, replay)
    L.update([random_batch(L.model, seed=1)], mix)
    assert len(replay) == 4  # 4 columns, stored once over 3 epochs
    out = L.update([random_batch(L.model, seed=2)], mix)
    assert len(replay) == 8 and out['opt/steps'] == 6.0 and L.steps == 2
