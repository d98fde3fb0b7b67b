"""Draws docs/images/what_mario_sees.png: the emulator's screen beside the observation the default config's network sees.

Run from the repository root: `.venv/bin/python docs/what_mario_sees.py`.
"""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from mario_a3c.config import TrainingConfig
from mario_a3c.envs import make_env
from mario_a3c.preview import rgb_screen
from mario_a3c.stacks import held_button_names

config = TrainingConfig()
env = make_env(**config.env_kwargs())
obs, info = env.reset(seed=0)
for _ in range(40):
    obs, *_ = env.step(1)  # walk right for a moment
channels = 1 if config.gray else 3
fig, axes = plt.subplots(1, config.stack + 2, figsize=(3 * (config.stack + 2), 3.2))
axes[0].imshow(rgb_screen(env))
axes[0].set_title("World 1-1 (256x240 RGB)")
for i, ax in enumerate(axes[1:config.stack + 1]):
    frame = obs[channels * i:channels * (i + 1)]  # [C, H, W]
    ax.imshow(frame.transpose(1, 2, 0).squeeze(), cmap="gray" if config.gray else None)
    ax.set_title(f"input t-{config.stack - 1 - i}")
held = obs[channels * config.stack:]  # [buttons, H, W]
axes[-1].imshow(np.hstack(list(held)), cmap="gray", vmin=0, vmax=255)
axes[-1].set_title("held: " + " ".join(held_button_names(config.actions)))
for ax in axes:
    ax.axis("off")
kind = "gray" if config.gray else "colour"
fig.suptitle(f"what the network sees: {config.stack} stacked {config.size}x{config.size} {kind} frames, "
             f"frame skip {config.frame_skip}, one plane per held button", y=0.04)
fig.savefig("docs/images/what_mario_sees.png", dpi=80, bbox_inches="tight")
env.close()
print("wrote docs/images/what_mario_sees.png", obs.shape)
