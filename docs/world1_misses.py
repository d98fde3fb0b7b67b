"""Draws docs/images/world1_misses.png: the last moments of episodes that missed the flag under the protocol.

Each row is one missed episode of a checkpoint played as `mario-a3c eval --episodes 20 --sticky 0.25 --noop-max 30
--seed N` plays it (argmax), the frames the agent saw in colour, two agent steps apart, ending where Mario died.

Run from the repository root: `.venv/bin/python docs/world1_misses.py`. The checkpoints are the runs' last committed
states when the picture was drawn (`runs/world1_stage4h` at 2.05M frames, `runs/world1_stage3g` at 1.27M frames). The
1-4 runs' folders were removed when the 1-4 agent shipped: commit 49d479a has them.
"""
from collections import defaultdict, deque

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mario_a3c.evaluate import evaluate

# (title, checkpoint, stage, seed, how many missed episodes to show)
CASES = [("1-4, world1_stage4h, seed 2", "runs/world1_stage4h/a3c_world1_stage4_latest.pt", 4, 2, 2),
         ("1-3, world1_stage3g, seed 0", "runs/world1_stage3g/a3c_world1_stage3_latest.pt", 3, 0, 2)]
FRAMES, EVERY = 6, 2   # frames per row, agent steps between them

rows = []
for title, ckpt, stage, seed, n in CASES:
    last = defaultdict(lambda: deque(maxlen=FRAMES * EVERY))   # episode -> its last frames
    def keep(frame, step, last=last):
        last[step["episode_index"]].append(frame)
    res = evaluate(ckpt, episodes=20, noop_max=30, sticky=0.25, stage=stage, seed=seed, callback=keep)
    missed = [i for i, e in enumerate(res["episodes"]) if not e["flag"]][:n]
    for i in missed:
        rows.append((f"{title}, episode {i}: died at x {res['episodes'][i]['max_x']}", list(last[i])[EVERY - 1::EVERY]))

fig, axes = plt.subplots(len(rows), FRAMES, figsize=(2.2 * FRAMES, 2.3 * len(rows)))
for r, (title, frames) in enumerate(rows):
    for c, ax in enumerate(axes[r]):
        if c < len(frames): ax.imshow(frames[c], interpolation="nearest")
        ax.axis("off")
    axes[r][0].set_title(title, loc="left", fontsize=9)
fig.tight_layout()
fig.savefig("docs/images/world1_misses.png", dpi=64)
print("wrote docs/images/world1_misses.png")
