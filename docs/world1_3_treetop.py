"""Where 1-3's argmax play misses the tall treetop: paths, policy probabilities and values over x 880-1,300.

Plays a checkpoint as `mario-a3c eval --episodes 20 --sticky 0.25 --noop-max 30 --seed N` plays it (argmax), keeping
for each agent step Mario's x and y, the action, the policy's probabilities and the critic's value. The loop is
`evaluate`'s (the same no-op counts, env seeds and sticky draws); the script checks that its flags are `evaluate`'s.
Prints a line per episode (flag, where it landed on the treetop that ends at x 1,020, its speed there, the value at the
edge), how sure the policy is over all steps, and draws docs/images/world1_3_treetop.png.

Run from the repository root: `.venv/bin/python docs/world1_3_treetop.py [CHECKPOINT] [SEED]`; the default is
`runs/world1_stage3y`'s last checkpoint (update 800, committed in bf71f91) and seed 0.
"""
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from mario_a3c.envs import make_env
from mario_a3c.evaluate import eval_env_kwargs, evaluate, load_agent
from mario_a3c.stacks import action_set

CKPT = sys.argv[1] if len(sys.argv) > 1 else "runs/world1_stage3y/a3c_world1_stage3_latest.pt"
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 0
EPISODES, NOOP_MAX, STICKY, STAGE = 20, 30, 0.25, 3
X0, X1 = 880, 1300   # the climb to the tall treetop and the treetop itself

torch.set_num_threads(1)
model, config, _ = load_agent(CKPT, "cpu")
names = ["+".join(a) for a in action_set(config.actions)]
noop = names.index("NOOP")
env = make_env(**eval_env_kwargs(config, stage=STAGE, max_steps=10_000, sticky=STICKY))
rng = np.random.default_rng(SEED)
episodes = []   # per episode: flag, and the agent steps as (x, y, action, probabilities [A], value)
with torch.no_grad():
    for ep in range(EPISODES):
        n_noop = int(rng.integers(0, NOOP_MAX + 1))
        obs, _ = env.reset(seed=SEED + ep)
        state, start, steps, t, done, info = model.initial_state(1), torch.ones(1, dtype=torch.bool), [], 0, False, {}
        while not done:
            if t < n_noop: action, row = noop, None
            else:
                o = torch.as_tensor(np.asarray(obs))[None]   # [1, C, H, W] uint8
                logits, value, state = model(o[None], state, start[None])   # [1, 1, A], [1, 1]
                p = logits[0, 0].softmax(-1).numpy()   # [A]
                action, start = int(p.argmax()), torch.zeros(1, dtype=torch.bool)
                row = (p, float(value[0, 0]))
            obs, _, terminated, truncated, info = env.step(action)
            done, t = terminated or truncated, t + 1
            if row: steps.append((int(info["x_pos"]), int(info["y_pos"]), action) + row)
        episodes.append((bool(info["flag_get"]), steps))
env.close()

ref = evaluate(CKPT, episodes=EPISODES, noop_max=NOOP_MAX, sticky=STICKY, stage=STAGE, seed=SEED)
assert [f for f, _ in episodes] == [e["flag"] for e in ref["episodes"]], "this loop and evaluate disagree"
print(f"{CKPT}, seed {SEED}: {sum(f for f, _ in episodes)} of {EPISODES} flags (evaluate agrees)")

for i, (flag, steps) in enumerate(episodes):
    # the treetop at y ~207 that ends near x 1,020: the first step at its height on the way down; did Mario fall on?
    near = [k for k, s in enumerate(steps)
            if 930 <= s[0] <= 1040 and 200 <= s[1] <= 212 and k and s[1] <= steps[k - 1][1]]
    if not near:
        print(f"episode {i:2d}: flag {flag!s:5}  never came down to the treetop (max x {max(s[0] for s in steps)})")
        continue
    k = near[0]
    dx = steps[k][0] - steps[k - 1][0]
    fell = any(s[1] < 195 for s in steps[k + 1:k + 4])   # on down past the treetop's top: off its edge
    edge = [s[4] for s in steps if 1000 <= s[0] <= 1035]
    print(f"episode {i:2d}: flag {flag!s:5}  down to the treetop at x {steps[k][0]:4d}, y {steps[k][1]} at {dx:2d} px "
          f"per step, {'fell off its edge' if fell else 'stood on it     '}; lowest value at x 1,000-1,035: "
          f"{min(edge):5.1f}; max x {max(s[0] for s in steps)}")

probs = np.array([s[3] for _, steps in episodes for s in steps])   # [steps, A]
top = probs.max(1)
entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
print(f"{len(probs)} agent steps: the chosen action's probability >= 0.95 at {np.mean(top >= 0.95):.0%}, "
      f">= 0.99 at {np.mean(top >= 0.99):.0%}; mean entropy {entropy.mean():.2f} nats "
      f"(uniform: {np.log(len(names)):.2f})")

fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
for flag, steps in episodes:
    s = [r for r in steps if X0 <= r[0] <= X1]
    if s and s[-1][1] > 240 and len(s) > 1 and s[-2][1] < 60: s = s[:-1]   # y wraps below the screen's bottom
    if not s: continue
    x = [r[0] for r in s]
    kw = dict(color="tab:green" if flag else "tab:red", alpha=0.6 if flag else 0.9, lw=1)
    a.plot(x, [r[1] for r in s], marker=".", ms=3, **kw)
    b.plot(x, [r[4] for r in s], **kw)
a.set_ylabel("y (px, up)")
a.set_title(f"1-3, argmax under the protocol, seed {SEED}: clears green, misses red", loc="left", fontsize=9)
b.set_ylabel("critic's value"); b.set_xlabel("x (px)")
fig.tight_layout()
fig.savefig("docs/images/world1_3_treetop.png", dpi=72)
print("wrote docs/images/world1_3_treetop.png")
