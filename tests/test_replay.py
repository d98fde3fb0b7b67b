"""Prioritized replay and packed segments against independent references (closed forms, numpy, chi-square)."""

import io
import math

import numpy as np
import pytest
import torch

from mario_a3c.replay import PrioritizedReplay, SumTree, chi2_quantile, chi_square
from mario_a3c.segments import (
    PackedSegment,
    Segment,
    collate_segments,
    noise_segments,
    pack_frames,
    packed_nbytes,
)

FIELDS = ("obs", "actions", "behaviour_logp", "rewards", "dones", "episode_start")


def filled(capacity=50, extra=20, alpha=0.6, seed=0):
    "A buffer of integers k with priority pri[k], written past capacity; returns it, pri and slot priorities."
    buf = PrioritizedReplay(capacity, alpha=alpha, seed=seed)
    pri = np.geomspace(0.05, 10, capacity + extra)
    np.random.default_rng(seed + 1).shuffle(pri)
    for k in range(capacity + extra):
        buf.add(k, pri[k])
    return buf, pri, pri[buf.items]


def closed_form(prio, alpha, eps=1e-6):
    q = (np.asarray(prio) + eps) ** alpha
    return q / q.sum()


# --- statistics helpers -------------------------------------------------------------------------------------------


def test_chi2_quantile_matches_tables():
    for (df, q), ref in {
        (10, 0.99): 23.209,
        (30, 0.95): 43.773,
        (50, 0.999): 86.661,
        (100, 0.99): 135.807,
    }.items():
        assert chi2_quantile(df, q) == pytest.approx(ref, rel=0.01)


def test_chi_square_is_calibrated():
    "Under the null, about 5% of multinomial samples exceed the 0.95 quantile."
    g = np.random.default_rng(0)
    p = g.uniform(0.05, 1, 20)
    stats = np.array([chi_square(g.multinomial(5000, p / p.sum()), p) for _ in range(2000)])
    assert abs(stats.mean() - 19) < 0.6
    assert 0.03 < (stats > chi2_quantile(19, 0.95)).mean() < 0.07


# --- sum tree -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 2, 7, 64, 100])
def test_sum_tree_matches_numpy_after_random_updates(capacity):
    g = np.random.default_rng(capacity)
    tree, leaves, touched = SumTree(capacity), np.zeros(capacity), np.zeros(capacity, bool)
    for _ in range(300):
        idx = g.integers(0, capacity, size=g.integers(1, 12))
        vals = g.exponential(size=len(idx)) * (g.random(len(idx)) > 0.1)  # some zeros too
        tree.update(idx, vals)
        leaves[idx], touched[idx] = vals, True
        assert tree.total == pytest.approx(leaves.sum(), rel=1e-12, abs=1e-12)
    assert tree.min == leaves[touched].min()
    np.testing.assert_array_equal(tree[np.arange(capacity)], leaves)
    if leaves.sum() > 0:
        v = g.uniform(0, leaves.sum(), 5000)
        np.testing.assert_array_equal(tree.find(v), np.searchsorted(np.cumsum(leaves), v, side="right"))


def test_sum_tree_never_returns_empty_leaf_at_the_top_end():
    tree = SumTree(5)
    tree.update(np.arange(3), [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(tree.find([tree.total, np.nextafter(tree.total, 0), 1e9]), [2, 2, 2])


def test_sum_tree_multinomial_chi_square():
    g = np.random.default_rng(1)
    p = g.uniform(0.05, 1, 40)
    t = SumTree(40)
    t.update(np.arange(40), p)
    counts = np.bincount(t.find(g.uniform(0, t.total, 100_000)), minlength=40)
    crit = chi2_quantile(39, 0.999)
    assert chi_square(counts, p) < crit
    assert chi_square(counts, p**0.8) > crit  # the test has power


# --- sampling distribution ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_sampled_frequencies_match_closed_form(alpha):
    buf, pri, prio = filled(alpha=alpha)
    target = closed_form(prio, alpha)
    np.testing.assert_allclose(buf.probs(), target, rtol=1e-12)
    counts = np.bincount(np.concatenate([buf.sample(50, 0.4)[0] for _ in range(400)]), minlength=50)
    crit = chi2_quantile(49, 0.999)
    assert chi_square(counts, target) < crit
    if alpha > 0:
        assert chi_square(counts, np.full(50, 1 / 50)) > crit  # not uniform
    n, newest = counts.sum(), 19  # 70 items written into 50 slots: the newest sits in slot 19
    assert buf.items[newest] == 69
    for i in (newest, int(prio.argmin())):
        assert abs(counts[i] - n * target[i]) < 4.5 * math.sqrt(n * target[i] * (1 - target[i]))


def test_single_draw_batches_are_multinomial():
    buf, _, prio = filled(seed=3)
    target = closed_form(prio, 0.6)
    counts = np.bincount(np.concatenate([buf.sample(1, 0.5)[0] for _ in range(6000)]), minlength=50)
    assert chi_square(counts, target) < chi2_quantile(49, 0.999)


def test_stratified_batch_covers_every_stratum():
    "With equal priorities and B = N, stratification draws every item exactly once."
    buf = PrioritizedReplay(16, seed=0)
    for k in range(16):
        buf.add(k, 2.0)
    for _ in range(20):
        assert sorted(buf.sample(16, 0.5)[0].tolist()) == list(range(16))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_importance_weights_closed_form(beta):
    """Weights are normalised by the largest weight of the whole buffer (its rarest item), not of the batch: the
    rarest item here is almost never drawn, so the two differ."""
    buf, _, prio = filled()
    rare = int(np.argmin(prio))
    prio[rare] = 1e-4  # 40 times less likely than the next rarest
    buf.update_priorities([rare], [prio[rare]])
    P = closed_form(prio, 0.6)
    idx, items, w = buf.sample(30, beta)
    assert rare not in idx and P[rare] < P[idx].min() / 30
    assert items == [buf.items[i] for i in idx]
    assert w.dtype == np.float32 and w.shape == (30,)
    np.testing.assert_allclose(w, (50 * P[idx]) ** -beta / ((50 * P) ** -beta).max(), rtol=1e-6)
    np.testing.assert_allclose(
        w, (P[idx] / P[rare]) ** -beta, rtol=1e-6
    )  # the same, written with the rarest item
    assert w.max() == 1 if beta == 0 else w.max() < 0.5  # the batch's own largest weight stays below 1


def test_priority_updates_change_the_distribution():
    buf, pri, prio = filled()
    old, up = closed_form(prio, 0.6), np.arange(0, 20, 2)
    new = prio.copy()
    new[up] *= 50
    buf.update_priorities(np.r_[up, up], np.r_[prio[up], new[up]])  # repeated indices: the last value wins
    target = closed_form(new, 0.6)
    np.testing.assert_allclose(buf.probs(), target, rtol=1e-12)
    counts = np.bincount(np.concatenate([buf.sample(50, 0.4)[0] for _ in range(400)]), minlength=50)
    crit = chi2_quantile(49, 0.999)
    assert chi_square(counts, target) < crit < chi_square(counts, old)
    assert buf.max_priority == max(pri.max(), new.max())
    assert buf.tree[buf.add("x")] == pytest.approx((buf.max_priority + 1e-6) ** 0.6)


def test_max_priority_default_and_running_max():
    buf = PrioritizedReplay(4, alpha=1.0)
    assert buf.max_priority == 1.0
    buf.add("a", 0.25)
    assert buf.max_priority == 0.25
    i = buf.add("b")
    assert buf.tree[i] == pytest.approx(0.25 + 1e-6)
    buf.update_priorities([0], [3.0])
    buf.update_priorities([0], [0.1])
    assert buf.max_priority == 3.0


# --- ring, seeding, errors ----------------------------------------------------------------------------------------


def test_wrap_around_overwrites_oldest():
    buf = PrioritizedReplay(5, seed=1)
    assert [buf.add(k) for k in range(12)] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert len(buf) == 5 and buf.items == [10, 11, 7, 8, 9]
    drawn = set()
    for _ in range(50):
        drawn.update(buf.sample(5, 0.5)[1])
    assert drawn == {7, 8, 9, 10, 11}


def test_seeded_sampling_is_reproducible():
    a, b = filled(seed=4)[0], filled(seed=4)[0]
    for _ in range(3):
        np.testing.assert_array_equal(a.sample(8, 0.5)[0], b.sample(8, 0.5)[0])
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    np.testing.assert_array_equal(a.sample(8, 0.5, rng=g1)[0], a.sample(8, 0.5, rng=g2)[0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: b.sample(6, 0.5), "batch_size must be in [1, 5] (items in the buffer), got 6"),
        (lambda b: b.sample(0, 0.5), "got 0"),
        (lambda b: b.sample(2, 1.5), "beta must be in [0, 1], got 1.5"),
        (lambda b: b.sample(2, -0.1), "beta must be in [0, 1], got -0.1"),
        (lambda b: b.add(1, -1.0), "priorities must be finite and >= 0, got -1.0"),
        (lambda b: b.add(1, float("nan")), "got nan"),
        (lambda b: b.update_priorities([0, 1], [1.0, float("inf")]), "got inf"),
        (lambda b: b.update_priorities([5], [1.0]), "index 5 not in the buffer (0 <= index < 5)"),
        (lambda b: b.update_priorities([0, 1], [1.0]), "2 indices but 1 priorities"),
        (lambda b: PrioritizedReplay(10, alpha=-0.5), "alpha must be >= 0, got -0.5"),
        (lambda b: PrioritizedReplay(0), "capacity must be >= 1, got 0"),
        (lambda b: PrioritizedReplay(3, eps=0), "eps must be > 0, got 0"),
        (lambda b: PrioritizedReplay(3).sample(1, 0.5), "batch_size must be in [1, 0]"),
    ],
)
def test_bad_arguments_raise_one_line_errors(call, message):
    buf = PrioritizedReplay(5, seed=0)
    for k in range(5):
        buf.add(k, k + 1.0)
    before = (buf.tree.total, buf.max_priority, len(buf))
    with pytest.raises(ValueError) as e:
        call(buf)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert (buf.tree.total, buf.max_priority, len(buf)) == before


# --- packed segments ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_type", ["reset", "zero"])
def test_pack_round_trip_with_episode_starts(padding_type):
    segs = noise_segments(8, p_end=0.25, padding_type=padding_type, seed=2)
    assert sum(int(s.episode_start[1:].sum()) for s in segs) >= 5
    for s in segs:
        back = PackedSegment.pack(s).unpack()
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(back, f), getattr(s, f))
        np.testing.assert_array_equal(back.init_state[0], s.init_state[0])


def test_pack_round_trip_unstacked_and_single_channel():
    g = np.random.default_rng(0)
    for obs in (
        g.integers(0, 256, (9, 4, 12, 12), dtype=np.uint8),  # never stacked
        g.integers(0, 2, (30, 1, 2, 2), dtype=np.uint8),  # C = 1 with many repeats
        g.integers(0, 2, (30, 3, 1, 1), dtype=np.uint8),
    ):  # tiny frames: coincidental shifts
        frames, index = pack_frames(obs)
        np.testing.assert_array_equal(frames[index], obs)
    frames, _ = pack_frames(g.integers(0, 256, (9, 4, 12, 12), dtype=np.uint8))
    assert len(frames) == 36


def test_pack_is_compact_and_copies():
    s = noise_segments(2, p_end=0.0, seed=3)[1]  # mid-episode, no start inside
    p = PackedSegment.pack(s)
    assert len(p.frames) == 4 + 32 and p.nbytes == packed_nbytes(32, state_nbytes=16 * 4)
    s.obs[:] = 0
    s.actions[:] = -1  # the collector may reuse its buffers
    assert p.frames.any() and (p.actions >= 0).all()


def test_pack_accepts_torch_tensors():
    s = noise_segments(1, seed=5)[0]
    t = Segment(
        *(torch.from_numpy(getattr(s, f)) for f in FIELDS), init_state=(torch.from_numpy(s.init_state[0]),)
    )
    back = PackedSegment.pack(t).unpack()
    np.testing.assert_array_equal(back.obs, s.obs)
    assert back.actions.dtype == np.int64 and back.dones.dtype == np.bool_


def test_pack_rejects_bad_segments():
    s = noise_segments(1, seed=6)[0]
    arrays = [getattr(s, f) for f in FIELDS]
    with pytest.raises(
        ValueError, match=r"Segment.obs has shape \(32, 4, 84, 84\), expected \(33, 4, 84, 84\)"
    ):
        PackedSegment.pack(Segment(s.obs[:-1], *arrays[1:]))
    with pytest.raises(ValueError, match="Segment.obs must be uint8"):
        PackedSegment.pack(Segment(s.obs.astype(np.float32), *arrays[1:]))
    with pytest.raises(ValueError, match="Segment.episode_start has shape"):
        PackedSegment.pack(Segment(*arrays[:-1], s.episode_start[:-1]))


# --- collate and the buffer holding segments ----------------------------------------------------------------------


def test_collate_time_major_and_state_batch_dim():
    segs = noise_segments(3, seed=7)
    b = collate_segments(segs)
    assert b.obs.shape == (33, 3, 4, 84, 84) and b.obs.dtype == torch.uint8
    assert (
        b.actions.shape == (32, 3)
        and b.episode_start.shape == (33, 3)
        and b.init_state[0].shape == (1, 3, 16)
    )
    for j, s in enumerate(segs):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(b, f)[:, j].numpy(), getattr(s, f))
        np.testing.assert_array_equal(b.init_state[0][:, j].numpy(), s.init_state[0][:, 0])
    flat = [Segment(*(getattr(s, f) for f in FIELDS), init_state=(s.init_state[0][0],)) for s in segs]
    assert collate_segments(flat, state_batch_dim=0).init_state[0].shape == (3, 16)
    with pytest.raises(ValueError, match=r"init_state\[0\] must have batch size 1 at dim 1"):
        collate_segments(flat)
    with pytest.raises(ValueError, match="segments differ"):
        collate_segments(segs[:1] + noise_segments(1, T=8))


def test_buffer_of_segments_returns_the_right_batch_and_saves_state():
    segs = noise_segments(6, p_end=0.2, seed=8)
    buf = PrioritizedReplay(4, seed=5)
    for k, s in enumerate(segs):
        buf.add(s, float(k + 1))
    slot_to_seg = [4, 5, 2, 3]
    idx, batch, w = buf.sample(4, 0.5)
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(batch.obs[:, j].numpy(), segs[slot_to_seg[i]].obs)
        np.testing.assert_array_equal(batch.rewards[:, j].numpy(), segs[slot_to_seg[i]].rewards)
    f = io.BytesIO()
    torch.save(buf.state_dict(items=True), f)
    f.seek(0)
    copy = PrioritizedReplay(1).load_state_dict(torch.load(f, weights_only=True))
    (i1, b1, w1), (i2, b2, w2) = buf.sample(3, 0.5), copy.sample(3, 0.5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(w1, w2)
    assert torch.equal(b1.obs, b2.obs) and torch.equal(b1.init_state[0], b2.init_state[0])
    assert copy.max_priority == 6.0 and len(copy) == 4


def test_memory_per_step_and_100k_budget():
    "A real fill measured against the exact formula; 100k steps of T=32 segments fit in 1 GiB."
    fill = noise_segments(20, p_end=0.02, seed=9, state_shape=(1, 1, 512))
    buf = PrioritizedReplay(20)
    for s in fill:
        buf.add(s)
    per_seg = packed_nbytes(32, state_nbytes=512 * 4)
    opens_reset = sum(bool(s.episode_start[0]) for s in fill)
    assert buf.nbytes - buf.tree.nbytes == 20 * per_seg - opens_reset * 3 * 84 * 84
    assert per_seg / 32 < 8 * 1024
    assert 100_000 // 32 * per_seg < 2**30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_is_stored_on_cpu_and_batch_moves_to_cuda():
    segs = noise_segments(2, seed=10)
    for s in segs:
        s.init_state = (torch.from_numpy(s.init_state[0]).cuda(),)
    buf = PrioritizedReplay(2, seed=0)
    for s in segs:
        buf.add(s)
    _, batch, _ = buf.sample(2, 0.5)
    assert batch.init_state[0].device.type == "cpu"
    on_gpu = batch.to("cuda", non_blocking=True)
    assert on_gpu.obs.is_cuda and on_gpu.init_state[0].is_cuda and on_gpu.obs.shape == (33, 2, 4, 84, 84)
