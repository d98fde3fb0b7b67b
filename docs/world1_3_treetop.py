"""Where 1-3's argmax play misses the tall treetop: paths, policy probabilities and values over x 880-1,300.

Plays a checkpoint with `evaluate`, as `mario-a3c eval --episodes 20 --sticky 0.25 --noop-max 30 --seed N` plays it
(argmax), keeping for each agent step Mario's x and y (its `callback`) and the policy's probabilities and the critic's
value (a forward hook on the network). Prints a line per episode (flag, where it came down onto the treetop that ends
at x 1,020, its speed there, the value at the edge), how sure the policy is over all steps, and draws
docs/images/world1_3_treetop.png.

Run from the repository root: `.venv/bin/python docs/world1_3_treetop.py [CHECKPOINT] [SEED]`; the default is
`runs/world1_stage3y`'s last checkpoint (update 800, committed in bf71f91) and seed 0.
"""
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from mario_a3c.evaluate import evaluate
from mario_a3c.models import ImpalaActorCritic

CKPT = sys.argv[1] if len(sys.argv) > 1 else "runs/world1_stage3y/a3c_world1_stage3_latest.pt"
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 0
X0, X1 = 880, 1300   # the climb to the tall treetop and the treetop itself

outputs, steps = [], {}   # the network's (probabilities [A], value) per agent step; episode -> its agent steps

def keep_output(module, args, out):
    if isinstance(module, ImpalaActorCritic):   # one call per agent step: logits [1, 1, A], value [1, 1]
        outputs.append((out[0][0, 0].softmax(-1).numpy(), float(out[1][0, 0])))

def keep_step(frame, info):
    if not info["noop"]:   # the step the last network call chose: (x, y, action, probabilities, value)
        steps.setdefault(info["episode_index"], []).append(
            (int(info["x_pos"]), int(info["y_pos"]), info["action"]) + outputs[-1])

hook = torch.nn.modules.module.register_module_forward_hook(keep_output)
try: res = evaluate(CKPT, episodes=20, noop_max=30, sticky=0.25, stage=3, seed=SEED, callback=keep_step)
finally: hook.remove()
assert len(outputs) == sum(map(len, steps.values())), "one network call per agent step"
episodes = [(e["flag"], steps[i]) for i, e in enumerate(res["episodes"])]
print(f"{CKPT}, seed {SEED}: {sum(f for f, _ in episodes)} of {len(episodes)} flags")

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
      f"(uniform: {np.log(probs.shape[1]):.2f})")

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
