"""Environment tests. They run on BOTH stacks (`make test` runs this file in the legacy venv too)."""

import json
import multiprocessing as mp
import warnings

import cv2
import numpy as np
import pytest

from mario_a3c.envs import EnvArgs, ShapedReward, check_env_args, gray_resize, load_demo, make_env
from mario_a3c.stacks import INFO_KEYS, JoypadActions, action_set, button_mask, make_raw_env, stack_name
from mario_a3c.vector import make_vec_env


def test_stack_matches_python():
    import sys

    assert stack_name() == ("modern" if sys.version_info >= (3, 13) else "legacy")


@pytest.mark.parametrize(
    "gray,size,stack,shape",
    [(True, 84, 4, (4, 84, 84)), (False, 64, 2, (6, 64, 64)), (True, 42, 1, (1, 42, 42))],
)
def test_observation_shapes(gray, size, stack, shape):
    env = make_env(1, 1, gray=gray, size=size, stack=stack, held_buttons=False)
    obs, _ = env.reset(seed=0)
    assert obs.shape == shape and obs.dtype == np.uint8 and env.observation_space.shape == shape
    obs, *_ = env.step(0)
    assert env.observation_space.contains(obs)
    env.close()


def test_default_env_is_the_recipe():
    "`make_env()` builds `EnvArgs()`: colour 64x64 frames, 4 stacked, the 4 held-button planes of the simple set."
    env = make_env()
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (4 * 3 + 4, 64, 64)
    env.close()
    a = EnvArgs()
    assert (a.gray, a.size, a.stack, a.held_buttons, a.repress_jump, a.max_episode_steps) == (
        False,
        64,
        4,
        True,
        True,
        0,
    )
    with pytest.raises(TypeError, match="unknown environment option"):
        make_env(colour=True)


def test_preprocessing_matches_manual_pipeline():
    """Frame skip + gray + max + resize + stack, rebuilt by hand from the raw emulator with the same actions."""
    actions = action_set("simple")
    rng = np.random.default_rng(0)
    acts = rng.integers(len(actions), size=12)
    env = make_env(1, 1, frame_skip=4, stack=4, gray=True, size=84, held_buttons=False, repress_jump=False)
    obs, _ = env.reset(seed=0)
    raw = make_raw_env(1, 1)
    first, _ = raw.reset(seed=0)
    # reference path: copy the RGB frame, gray it, max the last two of each skip, resize with area averaging
    gray = lambda f: cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY)
    small = lambda g: cv2.resize(g, (84, 84), interpolation=cv2.INTER_AREA)
    expected = [small(gray(first))] * 4  # the stack starts filled with the reset frame
    assert np.array_equal(obs, np.stack(expected))
    for a in acts:
        frames = []
        for _ in range(4):
            f, *_ = raw.step(button_mask(actions[a]))
            frames.append(gray(f))  # nes-py hands out its live buffer: keep a converted copy
        expected = expected[1:] + [small(np.maximum(frames[-2], frames[-1]))]
        obs, r, term, trunc, info = env.step(int(a))
        assert not (term or trunc)
        assert np.array_equal(obs, np.stack(expected))
    env.close()
    raw.close()


def test_gray_resize_close_to_luma_reference():
    frame = np.random.default_rng(1).integers(0, 256, (240, 256, 3), dtype=np.uint8)
    ref = frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    ref = cv2.resize(ref, (84, 84), interpolation=cv2.INTER_AREA)
    assert np.abs(gray_resize(frame, 84).astype(np.float64) - ref).max() <= 1.0


def test_episode_statistics_match_the_trajectory():
    env = make_env(1, 1, actions="right_only")
    _, info = env.reset(seed=2)
    rng = np.random.default_rng(2)
    xs, rewards = [info["x_pos"]], []
    while True:
        _, r, term, trunc, info = env.step(int(rng.integers(5)))
        xs.append(info["x_pos"])
        rewards.append(r)
        if term or trunc:
            break
    ep = info["episode"]
    assert ep["l"] == len(rewards)
    assert ep["r"] == pytest.approx(sum(rewards))
    assert ep["x"] == max(xs)
    assert ep["flag"] is False and (ep["world"], ep["stage"]) == (1, 1)
    # a death without the flag costs the death penalty on the last step
    assert rewards[-1] <= (15 - 50) / 10 + 1e-9


def test_native_reward_passthrough():
    shaped, native = make_env(1, 1), make_env(1, 1, reward="native")
    shaped.reset(seed=0)
    native.reset(seed=0)
    for _ in range(20):
        _, rs, *_, info_s = shaped.step(1)
        _, rn, *_, info_n = native.step(1)
        assert rn == info_n["native_reward"] == info_s["native_reward"]
    shaped.close()
    native.close()


def hand_shaped(last, info, terminated):
    """The designed reward of one step, worked out from the `info` before and after it: 0.1 * (clip(dx + dtime +
    dscore / 40, -15, 15) + 50 on the flag - 50 on a death); no x progress across a lost life or a new stage, and an
    x jump of more than 64 px (a pipe) paid in full outside the clip."""
    same = (info["world"], info["stage"], info["life"]) == (last["world"], last["stage"], last["life"])
    dx = info["x_pos"] - last["x_pos"] if same else 0
    pipe = dx if abs(dx) > 64 else 0
    raw = dx + (info["time"] - last["time"]) + (info["score"] - last["score"]) / 40
    r = min(max(raw - pipe, -15), 15) + pipe
    if info["flag_get"] and not last["flag_get"]:
        r += 50
    if info["life"] < last["life"] or (terminated and not info["flag_get"]):
        r -= 50
    return r / 10, raw


def test_shaped_reward_of_real_steps_progress_time_and_death():
    """`make_env`'s default reward on real steps: walking right, the clock, deaths (one with the clock's jump back to 400,
    clipped), the game over; then one stage's end by the Goomba."""
    env = make_env(full_game=True)  # three lives: a death respawns Mario at x 40 with the clock back at 400
    _, last = env.reset(seed=0)
    steps = []
    for t in range(600):
        _, r, term, trunc, info = env.step(
            0 if t < 100 else 1
        )  # let the clock run, then walk into the first Goomba
        want, raw = hand_shaped(last, info, term)
        steps.append((r, want, raw, dict(last), dict(info), term))
        last = info
        if term or trunc:
            break
    env.close()
    assert term and info["life"] == 255  # game over: the life counter wraps below 0
    for r, want, raw, before, after, _ in steps:
        assert r == pytest.approx(want, abs=1e-9), (before, after)
    walk = [
        s for s in steps if s[3]["life"] == s[4]["life"] and s[4]["x_pos"] - s[3]["x_pos"] == 7 and not s[5]
    ]
    assert {round(s[0], 9) for s in walk} == {
        0.7,
        0.6,
    }  # 7 pixels right: 0.7, or 0.6 in a step where the clock ticks
    deaths = [s for s in steps if s[4]["life"] < s[3]["life"] or s[5]]
    assert len(deaths) == 3
    first = deaths[0]
    assert (
        first[4]["time"] - first[3]["time"] > 15 and first[4]["x_pos"] == 40
    )  # respawned, the clock back at 400
    assert first[0] == pytest.approx(
        (15 - 50) / 10
    )  # the clock's jump is clipped to 15, then the death penalty
    assert deaths[-1][0] == pytest.approx((0 - 50) / 10)  # game over: nothing moves, the penalty alone
    assert sum(s[0] for s in steps) == pytest.approx(sum(s[1] for s in steps))

    env = make_env()  # one stage: walking right, Mario dies at the first Goomba and the episode ends
    _, last = env.reset(seed=0)
    for _ in range(200):
        _, r, term, trunc, info = env.step(1)
        assert r == pytest.approx(hand_shaped(last, info, term)[0], abs=1e-9), (last, info)
        if term or trunc:
            break
        last = info
    env.close()
    assert (
        term and not info["flag_get"] and info["life"] == last["life"]
    )  # ended by dying, the life not yet taken
    assert r == pytest.approx((info["x_pos"] - last["x_pos"] + info["time"] - last["time"] - 50) / 10)


def test_shaped_reward_pays_the_1_2_exit_pipe_in_full():
    """Along the 1-2 demo, per emulator frame: every step is the designed reward, and the exit pipe, which jumps x by more
    than 200 px, is paid in full (clipped, the route over the ceiling to the warp zone paid more than the pipe and the flag)."""
    env = ShapedReward(make_raw_env(1, 2))
    _, last = env.reset(seed=0)
    pipes = []
    for m in load_demo(1, 2):
        _, r, term, trunc, info = env.step(int(m))
        assert r == pytest.approx(hand_shaped(last, info, term)[0], abs=1e-9), (last, info)
        if abs(info["x_pos"] - last["x_pos"]) > 64:
            pipes.append((last["x_pos"], info["x_pos"], r))
        last = info
        if term or trunc:
            break
    env.close()
    assert info["flag_get"] and len(pipes) == 1, pipes
    before, after, r = pipes[0]
    assert before > 2600 and after - before > 200
    assert r >= (after - before - 15) / 10  # the jump, less at most a clipped clock tick


def test_time_limit_truncates():
    env = make_env(1, 1, max_episode_steps=5)
    env.reset(seed=0)
    out = [env.step(0) for _ in range(5)]
    assert [o[3] for o in out] == [False] * 4 + [True]
    assert out[-1][4]["episode"]["l"] == 5
    for no_limit in (0, None):  # 0 means no limit; None, from older callers, means the same
        env = make_env(1, 1, max_episode_steps=no_limit)
        env.reset(seed=0)
        assert not any(env.step(0)[3] for _ in range(10))


def test_stall_limit_ends_a_standing_mario_as_a_death():
    "Per agent step, under the reward: 20 steps of standing still end the episode with the death penalty."
    env = make_env(1, 1, stall_steps=20)
    env.reset(seed=0)
    out = [env.step(0) for _ in range(20)]
    assert [o[2] for o in out] == [False] * 19 + [True]
    assert out[-1][4]["episode"]["l"] == 20 and out[-1][1] <= -5.0
    env = make_env(1, 1, stall_steps=20)  # running right (to just before the first Goomba): never stalls
    env.reset(seed=0)
    assert not any(env.step(1)[2] for _ in range(30))


def test_noop_starts_run_the_clock_before_the_agent_acts():
    "0-30 no-op agent steps at each reset from the stage's start: 0-120 joypad frames, drawn from the reset's seed."
    env = make_env(1, 1, noop_max=30)
    ran = []
    for seed in [0, 1, 2, 3, 4, 5, 1]:
        before = env.get_wrapper_attr("frames")
        _, info = env.reset(seed=seed)
        ran.append(env.get_wrapper_attr("frames") - before)
        assert info["x_pos"] == 40, info["x_pos"]  # Mario stands at the start
    assert all(f % 4 == 0 and 0 <= f <= 120 for f in ran) and len(set(ran)) > 2, ran
    assert ran[-1] == ran[1], ran  # the same seed, the same no-ops


@pytest.mark.parametrize(
    "bad,msg",
    [
        (dict(world=0), "world=0 is not a Super Mario Bros world: allowed 1-8"),
        (dict(stage=5), "stage=5 is not a Super Mario Bros stage: allowed 1-4"),
        (dict(actions="all"), "actions='all' is not an action set: allowed right_only, simple, complex"),
        (dict(num_envs=0), "num_envs=0 is out of range: allowed >= 1"),
        (dict(frame_skip=0), "frame_skip=0 is out of range: allowed 1-16"),
    ],
)
def test_bad_input_fails_before_any_process_starts(bad, msg):
    kw = dict(num_envs=2, world=1, stage=1)
    kw.update(bad)
    with pytest.raises(ValueError) as e:
        make_vec_env(**kw)
    assert str(e.value) == msg
    assert mp.active_children() == []


def test_threads_and_async_workers_equal_sync_and_draw_their_own_stages():
    kw = dict(world=1, stage=1, random_stage=True, stage_span=4)
    res = {}
    for mode in ("threads", "async", "sync"):
        envs = make_vec_env(3, vectorization=mode, **kw)
        obs, info = envs.reset(seed=5)
        stages, frames = [list(zip(info["world"], info["stage"]))], [obs]
        rng = np.random.default_rng(0)
        for _ in range(150):
            obs, r, term, trunc, info = envs.step(rng.integers(7, size=3))
            frames.append(obs)
            if (term | trunc).any():
                stages.append(list(zip(info["world"], info["stage"])))
        envs.close()
        res[mode] = (np.stack(frames), stages)
    for mode in ("threads", "async"):
        assert np.array_equal(res[mode][0], res["sync"][0])
        assert res[mode][1] == res["sync"][1]
    singles = [make_env(**kw).reset(seed=5 + i)[1] for i in range(3)]
    assert res["async"][1][0] == [(s["world"], s["stage"]) for s in singles]


def test_same_step_boundary_and_episode_info():
    envs = make_vec_env(2, vectorization="async", world=1, stage=1, actions="right_only")
    obs, _ = envs.reset(seed=0)
    for _ in range(400):
        obs, r, term, trunc, info = envs.step(np.array([1, 1]))
        if (term | trunc).any():
            break
    envs.close()
    i = int(np.flatnonzero(term | trunc)[0])
    fin = info["final_info"]
    assert fin["_episode"][i] and fin["episode"]["x"][i] > 40
    first, _ = make_env(1, 1, actions="right_only").reset(seed=0)
    assert np.array_equal(obs[i], first)


def test_killed_worker_is_reported():
    """A dead worker makes the vector env raise at once (the trainer rebuilds it), never hang."""
    import os, signal

    envs = make_vec_env(2, vectorization="async", world=1, stage=1)
    envs.reset(seed=0)
    os.kill(envs.processes[0].pid, signal.SIGKILL)
    envs.processes[0].join(5)
    with pytest.raises((EOFError, ConnectionError, BrokenPipeError, OSError)):
        envs.step(np.array([0, 0]))
    envs.close(terminate=True)


def test_frame_counter_counts_emulator_frames():
    env = make_env(1, 1, frame_skip=3)
    env.reset(seed=0)
    for _ in range(10):
        env.step(0)
    assert env.get_wrapper_attr("frames") == 30
    assert isinstance(env.get_wrapper_attr("combos"), list)
    joy = JoypadActions(make_raw_env(1, 1), "complex")
    assert joy.action_space.n == 12 and joy.action(0) == 0


def test_held_buttons_planes_and_the_jump_they_explain():
    """A held A does not jump again: the planes must show the last action's buttons, and the game must agree."""
    env = make_env(1, 1, gray=False, size=42, stack=2, held_buttons=True, repress_jump=False)
    obs, _ = env.reset(seed=0)
    names = ["A", "B", "right", "left"]  # the buttons the simple set uses, in plane order
    assert obs.shape == (6 + 4, 42, 42) == env.observation_space.shape and not obs[6:].any()
    frames = make_env(1, 1, gray=False, size=42, stack=2, held_buttons=False, repress_jump=False)
    plain, _ = frames.reset(seed=0)
    combos, ys = action_set("simple"), []
    seq = (
        [1] * 10 + [2] * 20 + [2] * 4 + [1] + [2] * 4
    )  # walk, jump, keep A down after landing, release, jump again
    for a in seq:
        obs, *_, info = env.step(a)
        plain, *_ = frames.step(a)
        assert np.array_equal(obs[:6], plain)  # the frames are untouched
        for k, b in enumerate(names):
            assert set(np.unique(obs[6 + k])) == {255 if b in combos[a] else 0}, (a, b)
        ys.append(info["y_pos"])
    ground = ys[29]
    assert ys[30:34] == [ground] * 4  # right+A again while A is down: no jump
    assert max(ys[35:]) > ground + 10  # after one step without A, right+A jumps


def test_repress_jump_jumps_again_on_the_ground_and_keeps_high_jumps():
    """Held right+A: one take-off without `repress_jump`, one per landing with it; a single long press is unchanged."""

    def play(seq, **kw):
        env = make_env(1, 1, size=42, stack=1, **kw)
        env.reset(seed=0)
        ys = []
        for a in seq:
            *_, term, trunc, info = env.step(a)
            ys.append(info["y_pos"])
            if term or trunc:
                break
        env.close()
        return ys

    def take_offs(ys):  # steps where Mario leaves the ground (y_pos 79 on World 1-1's floor)
        return sum(a == 79 and b > 79 for a, b in zip([79] + ys, ys))

    held = [1] * 5 + [2] * 40  # walk, then hold right+A
    assert take_offs(play(held, repress_jump=False)) == 1
    assert take_offs(play(held, repress_jump=True)) >= 3
    long_press = [1] * 5 + [2] * 6 + [1] * 10  # one press of 24 frames
    assert play(long_press, repress_jump=True) == play(long_press, repress_jump=False)
    with pytest.raises(ValueError, match=r"repress_jump=1 is not a bool"):
        make_env(1, 1, repress_jump=1)


def test_sticky_actions_act_per_emulator_frame():
    """ALE's rule under the frame skip: frame k of a step still runs the previous action with probability p^k."""
    from mario_a3c.stacks import JoypadActions

    def late(p, steps=1500, seed=7):
        env = make_env(1, 1, size=42, stack=1, sticky_actions=p)
        joy = env
        while not isinstance(joy, JoypadActions):
            joy = joy.env
        ran, step = [], joy.step
        joy.step = lambda a: (ran.append(int(a)), step(a))[1]  # the action each emulator frame executes
        env.reset(seed=seed)
        rows = []
        for t in range(steps):
            chosen, before = 2 if t % 2 else 1, len(ran)  # right+A, right
            _, _, term, trunc, _ = env.step(chosen)
            if len(ran) - before == 4 and t:
                rows.append([a != chosen for a in ran[before:]])
            if term or trunc:
                env.reset()
        env.close()
        return np.mean(rows, axis=0)

    assert late(0.0).tolist() == [0, 0, 0, 0]
    assert np.allclose(late(0.25), 0.25 ** np.arange(1, 5), atol=0.03), late(0.25)
    with pytest.raises(ValueError, match=r"sticky_actions=1 is out of range: allowed 0 <= p < 1"):
        make_env(1, 1, sticky_actions=1)


def test_enemy_flags_in_ram_remove_the_first_goomba():
    """The probes' RAM switch on this stack: walking right, Mario dies at the first Goomba only where enemies are on."""
    from mario_a3c.probes import ENEMY_FLAGS, emulator_ram

    with_enemies, without = make_env(1, 1, size=42), make_env(1, 1, size=42)
    with_enemies.reset(seed=0)
    without.reset(seed=0)
    differ = []
    for _ in range(60):
        emulator_ram(without)[ENEMY_FLAGS] = 0
        oa, _, died, _, ia = with_enemies.step(1)
        ob, _, ended, _, ib = without.step(1)
        assert ia["x_pos"] == ib["x_pos"] and not ended
        differ.append(bool((oa != ob).any()))
        if died:
            break
    assert died and not ia["flag_get"]  # the Goomba killed the Mario that has enemies
    first = differ.index(True)
    assert 5 < first < len(differ) - 3 and all(
        differ[first:]
    )  # the screens differ from when it scrolls into view


def test_shipped_world1_1_agent_reaches_the_flag_on_this_stack():
    """The agent in the package was trained on the modern stack; both stacks emulate the same game, so it clears here too.
    Every step's reward is the designed one (the evaluation env is `make_env` with its default reward), the flag's too."""
    from mario_a3c.evaluate import evaluate, pretrained_path

    infos = []
    res = evaluate(
        pretrained_path("1-1"),
        episodes=1,
        noop_max=30,
        seed=4,
        max_steps=2000,
        callback=lambda frame, info: infos.append(info),
    )
    (ep,) = res["episodes"]
    assert (ep["flag"], ep["max_x"], ep["truncated"]) == (True, 3161, False), ep
    assert len(infos) == ep["length"] and infos[-1]["flag_get"] and not infos[-2]["flag_get"]
    for last, info in zip(infos, infos[1:]):
        assert info["reward"] == pytest.approx(hand_shaped(last, info, info is infos[-1])[0], abs=1e-9), (
            last,
            info,
        )
    last, flag = infos[-2:]  # the step that reaches the flag: its progress plus the flag bonus of 50
    assert flag["reward"] == pytest.approx(
        (flag["x_pos"] - last["x_pos"] + flag["time"] - last["time"] + 50) / 10
    )
    assert flag["score"] == last["score"] and flag["reward"] > 5
    assert ep["return"] == pytest.approx(sum(i["reward"] for i in infos))


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_shipped_demo_takes_the_flag_on_this_stack(stage):
    "A demo is one button mask per emulator frame: from the stage's start it takes the flag on its last frame."
    masks = load_demo(1, stage)
    env = make_raw_env(1, stage)
    env.reset(seed=0)
    for i, m in enumerate(masks):
        _, _, terminated, _, info = env.step(int(m))
        assert not terminated or i == len(masks) - 1, f"the episode ended at frame {i + 1} of {len(masks)}"
    assert terminated and info["flag_get"] and (info["world"], info["stage"]) == (1, stage)


def test_demo_starts_put_mario_where_a_plain_replay_does():
    "Modern: snapshots, legacy: a replay from the start; either way the episode starts at the demo's state."
    masks = load_demo(1, 4)
    env = make_env(1, 4, demo_starts=1.0)
    for seed in range(3):
        _, info = env.reset(seed=seed)
        frame = info["demo_frame"]
        raw = make_raw_env(1, 4)
        raw.reset(seed=0)
        for m in masks[:frame]:
            _, _, _, _, ref = raw.step(int(m))
        raw.close()
        assert frame > 0 and (info["x_pos"], info["y_pos"], info["time"]) == (
            ref["x_pos"],
            ref["y_pos"],
            ref["time"],
        )
        _, _, terminated, _, info = env.step(0)
        assert not terminated


def test_shipped_world1_4_agent_trained_with_retries_plays_on_this_stack():
    """The 1-4 agent was trained on the modern stack with `retry_starts`, which the legacy stack cannot run; playing
    starts every episode at the stage's start, so it plays (and clears, under the protocol's sticky actions) on both."""
    from mario_a3c.checkpoint import load_meta
    from mario_a3c.evaluate import evaluate, pretrained_path

    assert load_meta(pretrained_path("1-4"))["config"]["retry_starts"] > 0
    res = evaluate(pretrained_path("1-4"), episodes=1, noop_max=30, sticky=0.25, seed=0, max_steps=3000)
    (ep,) = res["episodes"]
    assert ep["flag"] and ep["max_x"] > 2200, ep
    assert json.loads(json.dumps(res))["episodes"] == res["episodes"]   # the --json line


def test_info_values_are_python_scalars():
    "Both stacks give the RAM's values as Python ints and bools (nes-py 8 reads numpy integers), so results serialize."
    env = make_raw_env(1, 1)
    _, info = env.reset(seed=0)
    infos = [info] + [env.step(3)[4] for _ in range(5)]
    for info in infos:
        assert {k: type(info[k]) for k in INFO_KEYS} == {
            **{k: int for k in INFO_KEYS}, "flag_get": bool, "status": str}, info
    json.dumps(infos)


def test_retry_starts_need_snapshots():
    "Modern: `retry_starts` keeps emulator snapshots; legacy (nes-py 8) has none and refuses in one line."
    if stack_name() == "modern":
        env = make_env(1, 1, retry_starts=0.5)
        _, info = env.reset(seed=0)
        assert info["x_pos"] > 0 and not info.get("retry")   # nothing to retry yet: the stage's start
    else:   # refused in the parent process (config and env checks), before any env is built
        for build in (lambda: check_env_args(1, 1, retry_starts=0.5), lambda: make_env(1, 1, retry_starts=0.5)):
            with pytest.raises(ValueError, match=r"retry_starts=0.5 needs emulator snapshots \(nes-py >= 9\)"):
                build()
