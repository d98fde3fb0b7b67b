"""Tiny runs for the tests: a network and outputs that make a run take seconds, each test's files under its tmp folder."""

# The settings most trainer tests were written for: gray frames without held-button planes (CountingEnv's channels),
# one pass over each rollout, plain advantages and an LSTM core. The defaults are the recipe, which differs.
BEFORE_RECIPE = dict(gray=True, held_buttons=False, epochs=1, minibatches=1, ppo_clip=0.0, adv_norm=False,
                     recurrent_type='lstm')
TINY_NET = dict(size=42, channels='4,8', blocks=1, hidden=32, core_size=32)   # a few thousand weights
QUICK = dict(warmup_updates=1, amp=False, compile=False, checkpoint_every=2, log_every_s=60.0)
# the same for the command line: `mario-a3c train ... *TINY_FLAGS`
TINY_FLAGS = ('--num-envs 2 --rollout-steps 4 --channels 4,8 --hidden 32 --core-size 32 --vectorization sync '
              '--no-compile --warmup-updates 1').split()


def outputs(tmp_path, run_name:str='t') -> dict:
    "Run name and every output folder of a run, under `tmp_path`."
    return dict(run_name=run_name, runs_dir=str(tmp_path / 'runs'), checkpoint_dir=str(tmp_path / 'models'),
                tensorboard_dir=str(tmp_path / 'tb'))
