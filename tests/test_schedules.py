"""Warm-up + cosine schedule: corners by closed form, monotonicity, AdamW param groups, state_dict resume."""

import io
import math

import pytest
import torch

from mario_a3c.schedules import warmup_cosine, warmup_cosine_factor


@pytest.mark.parametrize(
    "warmup,total,floor", [(10, 110, 0.2), (0, 50, 0.1), (3, 9, 0.0), (1, 2, 0.5), (7, 7, 0.3)]
)
def test_factor_corners(warmup, total, floor):
    f = lambda k: warmup_cosine_factor(k, warmup, total, floor)
    if warmup:
        assert math.isclose(f(0), 1 / warmup)  # first update: base / warmup
        assert f(warmup - 1) == 1.0  # end of warm-up: base lr exactly
    else:
        assert f(0) == 1.0  # no warm-up: start at base
    if total > warmup:
        assert f(warmup) == 1.0
        if (total - warmup) % 2 == 0:  # midpoint of the decay, closed form
            assert math.isclose(f((warmup + total) // 2), (1 + floor) / 2, rel_tol=1e-12, abs_tol=1e-15)
    assert f(total) == floor and f(total + 1) == floor and f(10 * total + 1000) == floor
    vals = [f(k) for k in range(2 * total + 5)]
    assert all(a < b for a, b in zip(vals[:warmup], vals[1:warmup]))  # rising in warm-up
    assert all(a >= b for a, b in zip(vals[warmup:], vals[warmup + 1 :]))  # never rising after it
    assert all(floor <= v <= 1.0 for v in vals[warmup:])


def test_factor_matches_cosine_closed_form():
    for k in range(20, 121):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 20) / 100))
        assert math.isclose(warmup_cosine_factor(k, 20, 120, 0.1), want, rel_tol=1e-12)


@pytest.mark.parametrize(
    "args,msg",
    [
        ((0, 0, 0, 0.1), "total_steps must be an integer >= 1, got 0"),
        ((0, 0, 10.0, 0.1), "total_steps must be an integer >= 1, got 10.0"),
        ((0, -1, 10, 0.1), "warmup_steps must be an integer in [0, total_steps=10], got -1"),
        ((0, 11, 10, 0.1), "warmup_steps must be an integer in [0, total_steps=10], got 11"),
        ((0, 2, 10, -0.1), "floor must be a number in [0, 1] (a fraction of the base lr), got -0.1"),
        ((0, 2, 10, 1.5), "floor must be a number in [0, 1]"),
        ((0, 2, 10, float("nan")), "floor must be a number in [0, 1]"),
        ((-1, 2, 10, 0.1), "step must be a number >= 0, got -1"),
    ],
)
def test_bad_values_give_one_line_value_errors(args, msg):
    with pytest.raises(ValueError) as e:
        warmup_cosine_factor(*args)
    assert msg in str(e.value) and "\n" not in str(e.value)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    if args[0] >= 0:  # the scheduler validates the same parameters up front
        with pytest.raises(ValueError, match="must be"):
            warmup_cosine(opt, args[1], args[2], args[3])


def make(lrs=(3e-4, 3e-5, 1e-2), warmup=5, total=25, floor=0.1, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)
    )
    groups = [{"params": model[i].parameters(), "lr": lr} for i, lr in zip((0, 2, 3), lrs)]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    return model, opt, warmup_cosine(opt, warmup, total, floor)


def train_step(model, opt, sched):
    lrs = [g["lr"] for g in opt.param_groups]
    model(torch.linspace(-1, 1, 6).reshape(2, 3)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return lrs


def test_adamw_param_groups_follow_the_curve_from_their_own_base():
    lrs = (3e-4, 3e-5, 1e-2)
    model, opt, sched = make(lrs)
    used = [train_step(model, opt, sched) for _ in range(40)]
    for k, step_lrs in enumerate(used):
        for base, lr in zip(lrs, step_lrs):
            assert math.isclose(lr, base * warmup_cosine_factor(k, 5, 25, 0.1), rel_tol=1e-12)
    assert used[4] == list(lrs)  # end of warm-up
    assert all(math.isclose(lr, b * 0.55, rel_tol=1e-12) for b, lr in zip(lrs, used[15]))  # midpoint
    assert all(math.isclose(lr, b * 0.1, rel_tol=1e-12) for b, lr in zip(lrs, used[-1]))  # floor


@pytest.mark.parametrize("k", [0, 3, 5, 14, 25, 31])
def test_state_dict_round_trip_continues_the_same_curve(k):
    model, opt, sched = make()
    for _ in range(k):
        train_step(model, opt, sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    straight = [train_step(model, opt, sched) for _ in range(15)]
    params_straight = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = make(seed=1)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    resumed = [train_step(model2, opt2, sched2) for _ in range(15)]
    assert resumed == straight
    for a, b in zip(params_straight, model2.parameters()):
        assert torch.equal(a, b.detach())
