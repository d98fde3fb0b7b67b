"""What one different action saves: a protocol episode replayed with a single agent step changed.

Plays episode E of `mario-a3c eval --checkpoint C --stage 3 --episodes 20 --sticky 0.25 --noop-max 30 --seed N`
(argmax) step by step, with the same no-op count and the same seeded sticky draws as `evaluate`, and checks that it
ends where `evaluate` says. Then, for each agent step k in a range and each action a, it plays the episode again with
the argmax replaced by a at step k alone, and prints whether Mario took the flag and his furthest x.

Run from the repository root: `.venv/bin/python docs/world1_3_one_step.py CHECKPOINT [SEED EPISODE FIRST LAST]`;
the default is seed 0, episode 0 and agent steps 74-86. In the argmax play of `runs/world1_stage3ac`'s checkpoint
(update 2,567) those are x 883-1,020: the landing before the jump to the treetop that ends at x 1,020, and that jump.
"""
import sys

import numpy as np
import torch
from mario_a3c.envs import make_env
from mario_a3c.evaluate import eval_env_kwargs, evaluate, load_agent
from mario_a3c.stacks import action_set

CKPT = sys.argv[1]
SEED, EPISODE, FIRST, LAST = (int(v) for v in (sys.argv[2:6] + ["0", "0", "74", "86"][len(sys.argv[2:6]):]))
NOOP_MAX, STICKY, STAGE = 30, 0.25, 3

model, config, _ = load_agent(CKPT, "cpu")
names = ["+".join(a) for a in action_set(config.actions)]
env = make_env(**eval_env_kwargs(config, None, STAGE, 10_000, render=False, sticky=STICKY))
rng = np.random.default_rng(SEED)
noops = [int(rng.integers(0, NOOP_MAX + 1)) for _ in range(EPISODE + 1)]   # evaluate's draws: one per episode, in order
torch.set_num_threads(1)

@torch.no_grad()
def play(change:dict) -> tuple:
    """The episode with the argmax replaced at the agent steps in `change` (step -> action).

    Returns (flag, max x, x after each agent step, the actions taken, the argmax's probability at each step)."""
    obs, _ = env.reset(seed=SEED + EPISODE)
    for _ in range(noops[EPISODE]): obs, *_ = env.step(names.index("NOOP"))
    state, start, xs, acts, probs = model.initial_state(1, "cpu"), torch.ones(1, dtype=torch.bool), [], [], []
    while True:
        a, logp, _, state = model.act(torch.as_tensor(np.asarray(obs))[None], state, start, deterministic=True)
        probs.append(float(logp[0].exp()))
        start = torch.zeros(1, dtype=torch.bool)
        acts.append(change.get(len(acts), int(a[0])))
        obs, _, terminated, truncated, info = env.step(acts[-1])
        xs.append(int(info["x_pos"]))
        if terminated or truncated: return bool(info["flag_get"]), max(xs), xs, acts, probs

flag, far, xs, argmax, p_argmax = play({})
ref = evaluate(CKPT, episodes=EPISODE + 1, noop_max=NOOP_MAX, sticky=STICKY, stage=STAGE, seed=SEED)["episodes"][-1]
assert (noops[EPISODE], flag, far) == (ref["noops"], ref["flag"], ref["max_x"]), \
    f"the replay ({noops[EPISODE]} no-ops, {flag}, {far}) is not evaluate's {ref}"
print(f"{CKPT}, seed {SEED}, episode {EPISODE} ({noops[EPISODE]} no-ops): flag {flag}, max x {far}")
print("x after agent steps", FIRST, "to", LAST, ":", xs[FIRST:LAST + 1])
for k in range(FIRST, LAST + 1):
    out = [f"{names[a]}: {'FLAG' if f else m}" for a in range(len(names)) if a != argmax[k]
           for f, m, *_ in [play({k: a})]]
    print(f"step {k:3d} (x {xs[k - 1]:4d}, argmax {names[argmax[k]]} at p {p_argmax[k]:.2f}):", ", ".join(out),
          flush=True)
