"""V-trace, GAE and the loss terms against independent references (naive eq. 1, plain loops, closed forms)."""

import math

import pytest
import torch

from mario_a3c.returns import entropy, entropy_loss, gae, policy_loss, value_loss, vtrace

DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def on_grid(f):
    "Parametrise a test over every dtype and device."
    return pytest.mark.parametrize("dtype", DTYPES)(pytest.mark.parametrize("device", DEVICES)(f))


def random_unroll(T=8, B=5, gamma=0.97, p_done=0.2, spread=2.3, seed=0, dtype=torch.float64, device="cpu"):
    "Random V-trace inputs (made in float64 on the CPU, then cast): log-ratios uniform in [-spread, spread]."
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    blogp = -3 * u(T, B)
    tlogp = blogp + spread * (2 * u(T, B) - 1)
    discounts = gamma * (u(T, B) >= p_done).double()
    inp = dict(
        behaviour_logp=blogp,
        target_logp=tlogp,
        rewards=2 * u(T, B) - 1,
        discounts=discounts,
        values=3 * u(T, B),
        bootstrap_value=3 * u(B),
    )
    return {k: v.to(dtype=dtype, device=device) for k, v in inp.items()}


def naive_vtrace(inp, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0):
    "IMPALA eq. 1 term by term in Python floats: v_s = V_s + sum_t (prod_{i<t} gamma_i c_i) rho_t (r_t + gamma_t V_{t+1} - V_t)."
    L = {k: v.double().cpu().tolist() for k, v in inp.items()}
    T, B = len(L["rewards"]), len(L["bootstrap_value"])
    rho = [[math.exp(L["target_logp"][t][b] - L["behaviour_logp"][t][b]) for b in range(B)] for t in range(T)]
    r, d, V = L["rewards"], L["discounts"], L["values"] + [L["bootstrap_value"]]
    vs = [[0.0] * B for _ in range(T)]
    pg = [[0.0] * B for _ in range(T)]
    for b in range(B):
        for s in range(T):
            total = V[s][b]
            for t in range(s, T):
                coef = 1.0
                for i in range(s, t):
                    coef *= d[i][b] * min(c_bar, rho[i][b])
                total += coef * min(rho_bar, rho[t][b]) * (r[t][b] + d[t][b] * V[t + 1][b] - V[t][b])
            vs[s][b] = total
        for s in range(T):
            v_next = vs[s + 1][b] if s + 1 < T else V[T][b]
            pg[s][b] = min(pg_rho_bar, rho[s][b]) * (r[s][b] + d[s][b] * v_next - V[s][b])
    return torch.tensor(vs, dtype=torch.float64), torch.tensor(pg, dtype=torch.float64)


def loop_gae(inp, lam):
    "GAE as a forward sum of (gamma lambda)-weighted TD errors for each (t, b)."
    L = {k: v.double().cpu().tolist() for k, v in inp.items()}
    r, v, boot, d = L["rewards"], L["values"], L["bootstrap_value"], L["discounts"]
    T, B = len(r), len(boot)
    adv = [[0.0] * B for _ in range(T)]
    for b in range(B):
        for t in range(T):
            weight = 1.0
            for k in range(t, T):
                v_next = v[k + 1][b] if k + 1 < T else boot[b]
                adv[t][b] += weight * (r[k][b] + d[k][b] * v_next - v[k][b])
                weight *= d[k][b] * lam
    return torch.tensor(adv, dtype=torch.float64)


def close(a, b, dtype):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), **TOL[dtype])


def gae_args(inp):
    return inp["rewards"], inp["values"], inp["bootstrap_value"], inp["discounts"]


# ---- V-trace


@on_grid
@pytest.mark.parametrize("clips", [(1.0, 1.0, 1.0), (2.0, 0.5, 1.5), (math.inf, math.inf, math.inf)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vtrace_matches_naive_double_sum(dtype, device, clips, seed):
    inp = random_unroll(seed=seed, dtype=dtype, device=device)
    rho = (inp["target_logp"] - inp["behaviour_logp"]).exp()
    assert rho.min() < 0.2 and rho.max() > 5  # ratios spread over two orders of magnitude
    assert (inp["discounts"] == 0).any()  # with episode ends
    rho_bar, c_bar, pg_rho_bar = clips
    out = vtrace(**inp, rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar)
    ref_vs, ref_pg = naive_vtrace(inp, rho_bar, c_bar, pg_rho_bar)
    assert out.vs.dtype == dtype and out.vs.device.type == device and out.vs.shape == (8, 5)
    close(out.vs, ref_vs, dtype)
    close(out.pg_advantages, ref_pg, dtype)


@on_grid
def test_on_policy_vtrace_is_n_step_return_and_gae1(dtype, device):
    inp = random_unroll(seed=3, dtype=dtype, device=device)
    inp["target_logp"] = inp["behaviour_logp"].clone()
    L = {k: v.double().cpu().tolist() for k, v in inp.items()}
    T, B = len(L["rewards"]), len(L["bootstrap_value"])
    G = [[0.0] * B for _ in range(T)]
    for b in range(B):
        g = L["bootstrap_value"][b]
        for t in reversed(range(T)):
            g = L["rewards"][t][b] + L["discounts"][t][b] * g
            G[t][b] = g
    vs = vtrace(**inp).vs
    close(vs, torch.tensor(G, dtype=torch.float64), dtype)
    g1 = gae(*gae_args(inp), lam=1.0)
    close(vs, g1.advantages + inp["values"], dtype)
    close(vs, g1.returns, dtype)


@on_grid
def test_clipping_is_noop_when_all_rho_at_most_one(dtype, device):
    inp = random_unroll(seed=4, dtype=dtype, device=device)
    inp["target_logp"] = inp["behaviour_logp"] - 2.3 * torch.rand(
        8, 5, generator=torch.Generator().manual_seed(9)
    ).to(dtype=dtype, device=device)
    a = vtrace(**inp)
    b = vtrace(**inp, rho_bar=math.inf, c_bar=math.inf, pg_rho_bar=math.inf)
    assert torch.equal(a.vs, b.vs) and torch.equal(a.pg_advantages, b.pg_advantages)


@on_grid
@pytest.mark.parametrize("k", [0, 3, 7])
def test_episode_end_cuts_the_trace(dtype, device, k):
    inp = random_unroll(seed=5, p_done=0.0, dtype=dtype, device=device)
    inp["discounts"][k] = 0.0
    before = vtrace(**inp, rho_bar=math.inf, c_bar=math.inf)
    inp["rewards"][k + 1 :] += 100.0
    inp["values"][k + 1 :] -= 7.0
    inp["bootstrap_value"] += 5.0
    after = vtrace(**inp, rho_bar=math.inf, c_bar=math.inf)
    assert torch.equal(after.vs[: k + 1], before.vs[: k + 1])
    assert torch.equal(after.pg_advantages[: k + 1], before.pg_advantages[: k + 1])
    if k + 1 < 8:
        assert not torch.equal(after.vs[k + 1 :], before.vs[k + 1 :])


@on_grid
def test_vtrace_and_gae_carry_no_gradient(dtype, device):
    inp = {k: v.requires_grad_() for k, v in random_unroll(seed=6, dtype=dtype, device=device).items()}
    out = vtrace(**inp)
    assert not out.vs.requires_grad and not out.pg_advantages.requires_grad
    g = gae(*gae_args(inp), lam=0.9)
    assert not g.advantages.requires_grad and not g.returns.requires_grad


# ---- GAE


@on_grid
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_loop(dtype, device, lam):
    inp = random_unroll(seed=7, dtype=dtype, device=device)
    out = gae(*gae_args(inp), lam=lam)
    assert out.advantages.dtype == dtype and out.advantages.device.type == device
    close(out.advantages, loop_gae(inp, lam), dtype)
    close(out.returns, loop_gae(inp, lam) + inp["values"].double().cpu(), dtype)


# ---- errors


def test_bad_inputs_give_one_line_value_errors():
    inp = random_unroll()
    cases = [
        (
            lambda: vtrace(**{**inp, "bootstrap_value": torch.zeros(4, dtype=torch.float64)}),
            "bootstrap_value must have shape [B]=(5,)",
        ),
        (
            lambda: vtrace(**{**inp, "bootstrap_value": torch.zeros(1, 5, dtype=torch.float64)}),
            "bootstrap_value must have shape",
        ),
        (lambda: vtrace(**{k: (v[:0] if v.ndim == 2 else v) for k, v in inp.items()}), "T=0"),
        (lambda: vtrace(**{**inp, "values": inp["values"][:, :3]}), "values has shape (8, 3)"),
        (lambda: vtrace(**{**inp, "rewards": inp["rewards"].float()}), "rewards has dtype torch.float32"),
        (lambda: vtrace(**{**inp, "rewards": inp["rewards"].long()}), "floating-point"),
        (lambda: vtrace(**{**inp, "rewards": inp["rewards"].tolist()}), "rewards must be a torch.Tensor"),
        (lambda: vtrace(**{**inp, "discounts": inp["discounts"][0]}), "discounts must have shape [T, B]"),
        (lambda: vtrace(**inp, rho_bar=0.0), "rho_bar must be a positive number"),
        (lambda: vtrace(**inp, c_bar=float("nan")), "c_bar must be a positive number"),
        (lambda: gae(*gae_args(inp), lam=-0.1), "lam must be a number in [0, 1]"),
        (
            lambda: gae(inp["rewards"], inp["values"], torch.zeros(3, dtype=torch.float64), inp["discounts"]),
            "bootstrap_value",
        ),
        (lambda: value_loss(inp["values"], inp["rewards"], torch.ones(3)), "weights must be"),
        (lambda: policy_loss(inp["values"], inp["rewards"][:2]), "has shape (2, 5)"),
        (lambda: entropy(torch.zeros(4, 3)), "logits must have shape [T, B, A]"),
    ]
    for f, msg in cases:
        with pytest.raises(ValueError) as e:
            f()
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- loss terms


@on_grid
def test_policy_loss_closed_form(dtype, device):
    p = torch.tensor([[0.5, 0.25], [0.8, 0.1]], dtype=dtype, device=device)
    logp = p.log().requires_grad_()
    adv = torch.tensor([[2.0, -1.0], [0.5, 3.0]], dtype=dtype, device=device, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [2.0, 0.5]], dtype=dtype, device=device)
    l = lambda *x: sum(x) / 4
    want = -l(2 * math.log(0.5), -math.log(0.25), 0.5 * math.log(0.8), 3 * math.log(0.1))
    want_w = -l(2 * math.log(0.5), 0.0, 2 * 0.5 * math.log(0.8), 0.5 * 3 * math.log(0.1))
    assert math.isclose(policy_loss(logp, adv).item(), want, rel_tol=1e-6)
    assert math.isclose(policy_loss(logp, adv, w).item(), want_w, rel_tol=1e-6)
    assert policy_loss(logp, adv, torch.ones_like(w)).item() == policy_loss(logp, adv).item()
    policy_loss(logp, adv).backward()
    assert adv.grad is None
    close(logp.grad, -adv.detach() / 4, dtype)


@on_grid
def test_value_loss_closed_form(dtype, device):
    v = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=dtype, device=device, requires_grad=True)
    tgt = torch.tensor([[0.0, 2.5], [1.0, 1.0]], dtype=dtype, device=device, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [2.0, 0.5]], dtype=dtype, device=device)
    assert math.isclose(value_loss(v, tgt).item(), 0.5 * (1 + 0.25 + 1 + 4) / 4, rel_tol=1e-6)
    assert math.isclose(value_loss(v, tgt, w).item(), 0.5 * (1 + 0 + 2 + 2) / 4, rel_tol=1e-6)
    assert value_loss(v, tgt, torch.ones_like(w)).item() == value_loss(v, tgt).item()
    wb = torch.tensor([3.0, 0.5], dtype=dtype, device=device)  # [B] weights broadcast over time
    assert value_loss(v, tgt, wb).item() == value_loss(v, tgt, wb.expand(2, 2)).item()
    value_loss(v, tgt).backward()
    assert tgt.grad is None
    close(v.grad, (v - tgt).detach() / 4, dtype)


@on_grid
def test_entropy_closed_form(dtype, device):
    logits = torch.tensor(
        [[[0.0, math.log(3.0)], [5.0, 5.0]], [[1.0, 1.0], [0.0, -math.inf]]], dtype=dtype, device=device
    )
    H_pq = math.log(4) - 0.75 * math.log(3)  # p = (1/4, 3/4)
    want = torch.tensor([[H_pq, math.log(2)], [math.log(2), 0.0]], dtype=torch.float64)
    close(entropy(logits), want, dtype)
    close(
        entropy(torch.full((3, 4, 7), 2.5, dtype=dtype, device=device)),
        torch.full((3, 4), math.log(7), dtype=torch.float64),
        dtype,
    )
    assert math.isclose(entropy_loss(logits).item(), -(H_pq + 2 * math.log(2)) / 4, rel_tol=1e-6)
    assert (
        entropy_loss(logits, torch.ones(2, 2, dtype=dtype, device=device)).item()
        == entropy_loss(logits).item()
    )
    w = torch.tensor([[0.0, 1.0], [4.0, 2.0]], dtype=dtype, device=device)
    assert math.isclose(entropy_loss(logits, w).item(), -(math.log(2) + 4 * math.log(2)) / 4, rel_tol=1e-6)
    masked = torch.tensor([[[0.3, -0.2, -math.inf]]], dtype=dtype, device=device, requires_grad=True)
    entropy(masked).sum().backward()
    assert torch.isfinite(masked.grad).all() and masked.grad[0, 0, 2].item() == 0.0
