"""How many deaths leave a snapshot to retry from: `RetryStarts`'s first setting against its current one.

Plays sampled episodes of a checkpoint from the stage's start as training does (sticky actions 0.25, 0-30 no-ops) with
a `RetryStarts` that keeps a snapshot every 4 frames that Mario stands on the ground and never retries. For each
episode that ends without the flag it prints the snapshots that each setting would have had to choose from: the first
setting (every 16 frames, up to 200 px before the end) and the current defaults (every 4 frames, up to 400 px), each
with its ring of the last 32 snapshots. A death with none leaves nothing to retry.

Run from the repository root: `.venv/bin/python docs/world1_retry_coverage.py [CHECKPOINT] [EPISODES]`, by default
`runs/world1_stage3i/a3c_world1_stage3_latest.pt` (update 1,063, commit 1dab87b) and 40 episodes.
"""
import sys
from collections import deque

import numpy as np
import torch
from mario_a3c.envs import RetryStarts, make_env
from mario_a3c.evaluate import eval_env_kwargs, load_agent

SETTINGS = {"every 16, 200 px": (16, 200), "every 4, 400 px": (4, 400)}   # (every, span), ring 32 each
RING = 32

ckpt = sys.argv[1] if len(sys.argv) > 1 else "runs/world1_stage3i/a3c_world1_stage3_latest.pt"
episodes = int(sys.argv[2]) if len(sys.argv) > 2 else 40
torch.set_num_threads(1)
model, config, _ = load_agent(ckpt)
env = make_env(**{**eval_env_kwargs(config, sticky=0.25), "noop_max": 30, "retry_starts": 0.5, "retry_every": 4})
retry = env
while not isinstance(retry, RetryStarts): retry = retry.env
retry.p = 0.0   # keeps snapshots, never retries: every episode starts from the stage's start
gen = torch.Generator().manual_seed(0)
covered = {name: 0 for name in SETTINGS}
deaths = 0
for ep in range(episodes):
    obs, _ = env.reset(seed=ep)
    retry._ring = deque(maxlen=10_000)   # every snapshot of this episode: (frame, x, state)
    state, start = model.initial_state(1, "cpu"), torch.ones(1, dtype=torch.bool)
    while True:
        o = torch.as_tensor(np.asarray(obs))[None]   # [1, C, H, W] uint8
        a, _, _, state = model.act(o, state, start, deterministic=False, generator=gen)
        start = torch.zeros(1, dtype=torch.bool)
        obs, _, terminated, truncated, info = env.step(int(a[0]))
        if terminated or truncated: break
    if info["flag_get"]: continue
    deaths += 1
    end, row = int(info["x_pos"]), []
    for name, (every, span) in SETTINGS.items():
        ring = [x for frame, x, _ in retry._ring if frame % every == 0][-RING:]
        near = [x for x in ring if end - span <= x < end]
        covered[name] += bool(near)
        row.append(f"{name}: {len(near):2d} from x {min(near) if near else '-'}")
    print(f"episode {ep:2d} ended at x {end:5d}   " + "   ".join(row), flush=True)
print(f"{deaths} of {episodes} episodes missed the flag; deaths with a snapshot to retry from: "
      + ", ".join(f"{name}: {n}" for name, n in covered.items()))
