"""How many deaths leave a snapshot to retry from: `RetryStarts`'s first setting against its current one.

Plays sampled episodes of a checkpoint from the stage's start as training does (sticky actions 0.25, 0-30 no-ops) and
records, for every emulator frame, Mario's x and whether he stands on the ground. For each episode that ends without
the flag it prints the snapshots each setting would have had to choose from, worked out from that record alone:

- first: a snapshot every 16 frames on the ground, the last 32 kept, from up to 200 px before the end;
- now: every 4 frames on the ground, the last 64 kept, one per place (a snapshot replaces those at or beyond its x),
  from up to 400 px before the end (`RetryStarts`'s defaults, `retry_every` and `retry_span`).

A death with none leaves nothing to retry.

Run from the repository root: `.venv/bin/python docs/world1_retry_coverage.py [CHECKPOINT] [EPISODES]`, by default
`runs/world1_stage3i/a3c_world1_stage3_latest.pt` (update 1,063, commit 1dab87b) and 40 episodes.
"""
import sys
from collections import deque

import gymnasium as gym
import numpy as np
import torch
from mario_a3c.envs import make_env
from mario_a3c.evaluate import eval_env_kwargs, load_agent
from mario_a3c.stacks import FLOAT_STATE, emulator_game


class Record(gym.Wrapper):
    "Around the emulator: (frame, x, on the ground) after every emulator frame of the episode."
    def reset(self, **kw):
        self.frames = []
        return self.env.reset(**kw)

    def step(self, action):
        out = self.env.step(action)
        if not (out[2] or out[3]):
            self.frames.append((len(self.frames) + 1, int(out[4]["x_pos"]), emulator_game(self).ram[FLOAT_STATE] == 0))
        return out


def first(frames, end):   # every 16 frames, ring 32, span 200
    ring = deque((x for f, x, ground in frames if ground and f % 16 == 0), maxlen=32)
    return [x for x in ring if end - 200 <= x < end]


def now(frames, end):   # every 4 frames, ring 64 with one per place, span 400
    ring = deque(maxlen=64)
    for f, x, ground in frames:
        if ground and f % 4 == 0:
            while ring and ring[-1] >= x: ring.pop()
            ring.append(x)
    return [x for x in ring if end - 400 <= x < end]


ckpt = sys.argv[1] if len(sys.argv) > 1 else "runs/world1_stage3i/a3c_world1_stage3_latest.pt"
episodes = int(sys.argv[2]) if len(sys.argv) > 2 else 40
torch.set_num_threads(1)
model, config, _ = load_agent(ckpt)
env = make_env(**{**eval_env_kwargs(config, sticky=0.25), "noop_max": 30})
above = env
while above.env is not emulator_game(env): above = above.env   # the wrapper right above the emulator
record = above.env = Record(above.env)
gen = torch.Generator().manual_seed(0)
covered, deaths = {"first": 0, "now": 0}, 0
for ep in range(episodes):
    obs, _ = env.reset(seed=ep)
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
    for name, near in (("first", first(record.frames, end)), ("now", now(record.frames, end))):
        covered[name] += bool(near)
        row.append(f"{name}: {len(near):2d} from x {min(near) if near else '-'}")
    print(f"episode {ep:2d} ended at x {end:5d}   " + "   ".join(row), flush=True)
print(f"{deaths} of {episodes} episodes missed the flag; deaths with a snapshot to retry from: "
      + ", ".join(f"{name}: {n}" for name, n in covered.items()))
