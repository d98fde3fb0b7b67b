"""How sure a policy is along its own argmax play: the probability it leaves to other actions, step by step.

Plays the 20 argmax episodes of `mario-a3c eval --checkpoint C --stage S --episodes 20 --sticky 0.25 --noop-max 30
--seed N` step by step, with the same no-op counts and the same seeded sticky draws as `evaluate` (and checks that each
ends where `evaluate` says), and at every agent step after the no-ops reads the policy's whole distribution. It prints:

- the mean and the quartiles of 1 - max pi, the share of samples that would leave the argmax at that step;
- the mean KL(uniform || pi) (`mario_a3c.returns.uniform_kl`, the term `uniform_kl_beta` weighs);
- over the steps with x in [LO, HI] where the argmax holds A: the median log-probability of the likeliest action
  without A, and of `left`.

Run from the repository root: `.venv/bin/python docs/policy_saturation.py CHECKPOINT [STAGE SEED LO HI]`; the default
is stage 3, seed 0 and x 850-1,500 (1-3 from the landing before the tall treetop to the lift).
"""
import sys

import numpy as np
import torch
from mario_a3c.envs import make_env
from mario_a3c.evaluate import eval_env_kwargs, evaluate, load_agent
from mario_a3c.returns import uniform_kl
from mario_a3c.stacks import action_set

CKPT = sys.argv[1]
STAGE, SEED, LO, HI = (int(v) for v in (sys.argv[2:6] + ["3", "0", "850", "1500"][len(sys.argv[2:6]):]))
EPISODES, NOOP_MAX, STICKY = 20, 30, 0.25

model, config, _ = load_agent(CKPT, "cpu")
names = ["+".join(a) for a in action_set(config.actions)]
holds_a = [i for i, n in enumerate(names) if "A" in n.split("+")]
no_a = [i for i, n in enumerate(names) if i not in holds_a]
env = make_env(**eval_env_kwargs(config, None, STAGE, 10_000, render=False, sticky=STICKY))
rng = np.random.default_rng(SEED)
noops = [int(rng.integers(0, NOOP_MAX + 1)) for _ in range(EPISODES)]   # evaluate's draws: one per episode, in order
torch.set_num_threads(1)

@torch.no_grad()
def play(episode:int) -> tuple:
    "(flag, max x, [steps, A] log-probs after the no-ops, x before each of those steps)."
    obs, info = env.reset(seed=SEED + episode)
    for _ in range(noops[episode]): obs, _, _, _, info = env.step(names.index("NOOP"))
    state, start, logps, xs = model.initial_state(1, "cpu"), torch.ones(1, dtype=torch.bool), [], []
    while True:
        logits, _, state = model(torch.as_tensor(np.asarray(obs))[None, None], state, start[None])   # [1, 1, A]
        start = torch.zeros(1, dtype=torch.bool)
        logps.append(logits[0, 0].float().log_softmax(-1))                                            # [A]
        xs.append(int(info["x_pos"]))
        obs, _, terminated, truncated, info = env.step(int(logps[-1].argmax()))
        if terminated or truncated:
            return bool(info["flag_get"]), max(xs + [int(info["x_pos"])]), torch.stack(logps), xs

ref = evaluate(CKPT, episodes=EPISODES, noop_max=NOOP_MAX, sticky=STICKY, stage=STAGE, seed=SEED)["episodes"]
leave, kl, best_no_a, left = [], [], [], []
for e in range(EPISODES):
    flag, far, logp, xs = play(e)
    assert (noops[e], flag, far) == (ref[e]["noops"], ref[e]["flag"], ref[e]["max_x"]), \
        f"episode {e}: the replay ({noops[e]} no-ops, {flag}, {far}) is not evaluate's {ref[e]}"
    leave.append(1 - logp.max(-1).values.exp())                                                       # [steps]
    kl.append(uniform_kl(logp[None])[0])                                                               # [steps]
    x = torch.tensor(xs)
    there = (x >= LO) & (x <= HI) & torch.isin(logp.argmax(-1), torch.tensor(holds_a))                # [steps]
    best_no_a.append(logp[there][:, no_a].max(-1).values)
    if "left" in names: left.append(logp[there][:, names.index("left")])
leave, kl, best_no_a = torch.cat(leave), torch.cat(kl), torch.cat(best_no_a)
q = torch.quantile(leave.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double)).tolist()
flags = sum(r["flag"] for r in ref)
print(f"{CKPT}, stage {STAGE}, seed {SEED}: {flags} flags of {EPISODES}, {len(leave)} agent steps")
print(f"1 - max pi: mean {leave.mean():.4f}, quartiles {q[0]:.2e} {q[1]:.2e} {q[2]:.2e}; "
      f"KL(uniform || pi): mean {kl.mean():.2f} nats")
print(f"x {LO}-{HI}, argmax holding A ({len(best_no_a)} steps): median log pi of the likeliest action without A "
      f"{best_no_a.median():.1f}" + (f", of left {torch.cat(left).median():.1f}" if left else ""))
