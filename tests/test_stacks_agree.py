"""The two emulator stacks give the agent the same experience: same frames, same shaped reward, same episode ends.

Runs the same seeded random play in this interpreter and in the other stack's interpreter (the legacy venv that
`make test` builds, or $MARIO_A3C_OTHER_PYTHON) and compares the trajectories step by step.
"""

import hashlib, json, os, subprocess, sys
from pathlib import Path

import pytest

PLAY = r"""
import hashlib, json, numpy as np
from mario_a3c.envs import make_env
from mario_a3c.stacks import stack_name
env = make_env(1, 1, actions='right_only')
obs, info = env.reset(seed=0)
rng, out = np.random.default_rng(7), []
for t in range(600):
    obs, r, term, trunc, info = env.step(int(rng.integers(5)))
    out.append([round(float(r), 6), int(info['x_pos']), bool(term), bool(trunc), hashlib.sha1(obs.tobytes()).hexdigest()])
    if term or trunc: obs, info = env.reset()
print(json.dumps({'stack': stack_name(), 'steps': out}))
"""


def _other_python():
    if os.environ.get("MARIO_A3C_OTHER_PYTHON"):
        return os.environ["MARIO_A3C_OTHER_PYTHON"]
    root = Path(__file__).resolve().parents[1]
    mine = Path(sys.prefix).resolve()
    for venv in (root / ".venv-legacy", root / ".venv"):
        py = venv / "bin" / "python"
        if py.exists() and venv.resolve() != mine:
            return str(py)
    return None


def _play(python):
    res = subprocess.run([python, "-c", PLAY], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_both_stacks_give_identical_experience():
    other = _other_python()
    if other is None:
        pytest.skip("the other stack's venv is not built (run `make venv-legacy`)")
    a, b = _play(sys.executable), _play(other)
    assert {a["stack"], b["stack"]} == {"modern", "legacy"}
    assert len(a["steps"]) == len(b["steps"]) == 600
    ends = sum(s[2] or s[3] for s in a["steps"])
    assert ends >= 2  # the comparison crosses episode boundaries
    for t, (x, y) in enumerate(zip(a["steps"], b["steps"])):
        assert x == y, f"stacks differ at step {t}: {a['stack']} {x} vs {b['stack']} {y}"
