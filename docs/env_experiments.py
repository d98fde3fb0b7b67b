"""Reproduce the findings of docs/ENV_DEBUGGING_REPORT.md, one experiment per subcommand.

    python docs/env_experiments.py NAME      # in the venv named in the report (.venv, .venv-legacy or a NumPy 2 one)

Each experiment prints what it observed; none of them changes anything.
"""
import sys, time, traceback


def numpy2():
    """nes-py 8 on NumPy 2: constructing an env overflows (uint8 arithmetic with Python ints)."""
    import numpy as np
    print("numpy", np.__version__)
    try:
        from gym_super_mario_bros.smb_env import SuperMarioBrosEnv
        env = SuperMarioBrosEnv(target=(1, 1))
        env.reset()
        print("constructed and reset fine")
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        print(f"{type(e).__name__}: {e}  (at {tb.filename.split('site-packages/')[-1]}:{tb.lineno})")


def step_tuple():
    """gym 0.26 without apply_api_compatibility gets nes-py 8's 4-tuple; gym's own wrappers expect 5 values."""
    import gym, gym_super_mario_bros  # noqa: F401
    for compat in (False, True):
        env = gym.make("SuperMarioBros-1-1-v0", apply_api_compatibility=compat, disable_env_checker=True)
        env.reset()
        try:
            out = env.step(0)
            print(f"apply_api_compatibility={compat}: step returns {len(out)} values")
        except ValueError as e:
            print(f"apply_api_compatibility={compat}: ValueError: {e}")


def joypad_seed():
    """nes-py 8's JoypadSpace.reset does not accept seed= (Gymnasium vector envs always pass it)."""
    import gym, gym_super_mario_bros  # noqa: F401
    from nes_py.wrappers import JoypadSpace
    from gym_super_mario_bros.actions import SIMPLE_MOVEMENT
    env = JoypadSpace(gym.make("SuperMarioBros-1-1-v0", apply_api_compatibility=True), SIMPLE_MOVEMENT)
    try:
        env.reset(seed=0)
        print("reset(seed=0) works")
    except TypeError as e:
        print("TypeError:", e)


def removed_apis():
    """APIs that older Mario code calls and that today's packages no longer have."""
    import gymnasium
    print("gymnasium", gymnasium.__version__)
    try:
        from gymnasium.wrappers import FrameSkip  # noqa: F401
        print("gymnasium.wrappers.FrameSkip exists")
    except ImportError as e:
        print("ImportError:", e)
    import gym_super_mario_bros  # noqa: F401
    ids = [k for k in gymnasium.registry if "SuperMario" in k]
    print(len(ids), "Mario ids registered in gymnasium; RandomStages among them:", any("RandomStages" in k for k in ids),
          "; v1-v3 ROM variants:", sorted({k[-2:] for k in ids}))


def zero_copy():
    """The emulator hands out its live screen buffer: the reset frame changes when you step."""
    import numpy as np
    from mario_a3c.stacks import make_raw_env, stack_name
    env = make_raw_env(1, 1)
    first, _ = env.reset(seed=0)
    kept = first.copy()
    for _ in range(30):
        nxt, *_ = env.step(128)
    print(stack_name(), "| reset frame and step frame share memory:", np.shares_memory(first, nxt),
          "| the reset frame changed under us:", not np.array_equal(first, kept))


def next_step():
    """Gymnasium 1.x NextStep autoreset: the step after an episode end is a fake transition (reset obs, reward 0)."""
    import numpy as np
    from mario_a3c.envs import make_env
    from mario_a3c.vector import make_vec_env
    reset_obs, _ = make_env(1, 1, actions="right_only").reset(seed=0)
    for mode in ("NextStep", "SameStep"):
        envs = make_vec_env(1, vectorization="sync", autoreset_mode=mode, world=1, stage=1, actions="right_only")
        envs.reset(seed=0)
        for t in range(400):
            obs, r, term, trunc, info = envs.step(np.array([1]))
            if term[0] or trunc[0]:
                break
        print(f"{mode}: the episode ends at step {t} (reward {r[0]:+.2f}); "
              f"obs returned with the end is the next episode's first: {np.array_equal(obs[0], reset_obs)}")
        obs2, r2, *_ = envs.step(np.array([4]))  # right+A+B: would move Mario if it were played
        print(f"{' ' * len(mode)}  following step: reward {r2[0]:+.2f}, "
              f"obs is still the reset frame (action ignored): {np.array_equal(obs2[0], reset_obs)}")
        envs.close()


def async_start():
    """Async workers start under every start method; time to first observation."""
    from mario_a3c.vector import make_vec_env
    for ctx in ("fork", "forkserver", "spawn"):
        t0 = time.perf_counter()
        envs = make_vec_env(2, vectorization="async", context=ctx, world=1, stage=1)
        envs.reset(seed=0)
        print(f"{ctx:>10}: 2 workers ready in {time.perf_counter() - t0:.2f} s")
        envs.close()


def worker_failures():
    """What a dead worker and a hung worker look like from the parent."""
    import os, signal
    import numpy as np
    from mario_a3c.vector import make_vec_env
    envs = make_vec_env(2, vectorization="async", world=1, stage=1)
    envs.reset(seed=0)
    os.kill(envs.processes[0].pid, signal.SIGKILL)
    envs.processes[0].join(5)
    t0 = time.perf_counter()
    try:
        envs.step(np.array([0, 0]))
    except Exception as e:
        print(f"killed worker: {type(e).__name__}({str(e)!r}) after {time.perf_counter() - t0:.3f} s")
    envs.close(terminate=True)
    envs = make_vec_env(2, vectorization="async", world=1, stage=1)
    envs.reset(seed=0)
    os.kill(envs.processes[1].pid, signal.SIGSTOP)  # a worker stuck in native code looks like this
    envs.step_async(np.array([0, 0]))
    t0 = time.perf_counter()
    try:
        envs.step_wait(timeout=2.0)
    except Exception as e:
        print(f"hung worker: {type(e).__name__}({str(e)!r}) after {time.perf_counter() - t0:.2f} s (timeout 2 s)")
    # close(terminate=True) sends SIGTERM and joins: a stopped process never acts on SIGTERM, so the join would block
    # forever. SIGKILL first (it works on stopped processes too), then close.
    t0 = time.perf_counter()
    for p in envs.processes:
        p.kill()
    envs.close(terminate=True)
    print(f"kill + close(terminate=True) took {time.perf_counter() - t0:.2f} s")


def info_overhead():
    """Vector envs gather every info key every step: the full nes-py 9 info costs real throughput."""
    import numpy as np
    from mario_a3c.vector import make_vec_env
    from mario_a3c.envs import KEEP_INFO, make_env
    for keep in (KEEP_INFO, None):
        envs = make_vec_env(4, vectorization="sync", env_fn=lambda keep=keep, **kw: _env_keep(keep, **kw), world=1, stage=1)
        envs.reset(seed=0)
        rng = np.random.default_rng(0)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 8:
            _, _, _, _, info = envs.step(rng.integers(7, size=4)); n += 1
        print(f"info keys {len(info):3d}: {n * 4 * 4 / (time.perf_counter() - t0):6.0f} frames/s (4 sync envs)")
        envs.close()


def _env_keep(keep, **kw):
    from mario_a3c.envs import EpisodeStats, make_env
    env = make_env(**kw)
    w = env
    while not isinstance(w, EpisodeStats):
        w = w.env
    w.keep_info = keep
    return env


def _loop(kind, seconds, q):
    import numpy as np
    from mario_a3c.bench_env import raw_env
    from mario_a3c.envs import make_env
    env = make_env(1, 1) if kind == "wrapped" else raw_env()
    env.reset(seed=0)
    rng, t0 = np.random.default_rng(0), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, term, trunc, _ = env.step(int(rng.integers(7)))
        if term or trunc:
            env.reset()
    q.put(env.get_wrapper_attr("frames") / (time.perf_counter() - t0))


def independent():
    """Emulators in 1 or 2 independent processes (no vector env, no lock step): what the cores can give."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for kind in ("raw", "wrapped"):
        for n in (1, 2):
            q = ctx.Queue()
            ps = [ctx.Process(target=_loop, args=(kind, 8, q)) for _ in range(n)]
            for p in ps:
                p.start()
            fps = [q.get() for _ in ps]
            for p in ps:
                p.join()
            print(f"{kind:>7}, {n} process(es): {sum(fps):6.0f} frames/s in all")


# the worker processes as the report measured them before they had threads: two, one thread each
_TWO_WORKERS = dict(num_workers=2, worker_threads=1)


def _measure(benches, **kw):
    """`mario_a3c.bench_env.measure(benches, **kw)`, closing every bench's envs afterwards."""
    from mario_a3c.bench_env import measure
    try:
        return measure(benches, **kw)
    finally:
        for b in benches.values():
            b.close()


def scaling():
    """Vector env throughput against the number of envs, both async implementations, in one interleaved run."""
    from mario_a3c.bench_env import _Single, _Vector, raw_env
    benches = {"raw, 1 process": _Single(raw_env(), 0)}
    for mode in ("async", "gym-async"):
        for n in (2, 4, 8):
            benches[f"{mode}, {n} envs"] = _Vector(n, mode, "simple", 0, **(_TWO_WORKERS if mode == "async" else {}))
    m = _measure(benches, seconds=84, rounds=6)
    raw = m["raw, 1 process"]
    for k, v in m.items():
        print(f"{k:>18}: {v:6.0f} frames/s  ({v / raw:.2f}x raw)")


def double_buffer():
    """8 envs in 2 workers stepped in lock step and double-buffered (two groups), with the machine's CPU use, in one run."""
    from mario_a3c.bench_env import _Single, _Vector, raw_env
    w = _TWO_WORKERS
    benches = {"raw, 1 process": _Single(raw_env(), 0),
               "lock step": _Vector(8, "async", "simple", 0, **w), "double-buffered": _Vector(8, "async", "simple", 0, groups=2, **w)}
    utils = {}
    m = _measure(benches, seconds=90, rounds=15, utils=utils)
    raw = m["raw, 1 process"]
    for k, v in m.items():
        print(f"{k:>16}: {v:6.0f} frames/s  ({v / raw:.2f}x raw), machine CPU {utils[k]:.2f}")


def _against_ceiling(setups):
    """Measure `setups` (name -> bench) next to one raw emulator process and the raw emulator free-running in one
    process per core (100 s, 10 rounds); print each as a multiple of the first and a share of the second."""
    from functools import partial
    from mario_a3c.bench_env import _Free, _Single, raw_env
    benches = {"raw, 1 process": _Single(raw_env(), 0), "raw, free": _Free(partial(raw_env), 0), **setups}
    utils = {}
    m = _measure(benches, seconds=100, rounds=10, utils=utils)
    raw, free, w = m["raw, 1 process"], m["raw, free"], max(map(len, m))
    for k, v in m.items():
        print(f"{k:>{w}}: {v:6.0f} frames/s  ({v / raw:.2f}x raw, {v / free:.2f} of raw free), machine CPU {utils[k]:.2f}")


def ceiling():
    """What the vector env keeps of the machine's parallel speed: free-running processes (one per core) with the raw
    emulator, the full stack with 1 and with 4 envs each, and the double-buffered vector env (8 envs, 2 groups)."""
    from functools import partial
    from mario_a3c.bench_env import _Free, _Vector
    from mario_a3c.envs import make_env
    _against_ceiling({"full stack, free, 1 env each": _Free(partial(make_env, 1, 1), 0),
                      "full stack, free, 4 envs each": _Free(partial(make_env, 1, 1), 0, per_proc=4),
                      "vector env, double-buffered": _Vector(8, "async", "simple", 0, groups=2, **_TWO_WORKERS)})


def threads():
    """The double-buffered vector env (8 envs, 2 groups) in worker processes and in threads, against the machine's
    ceiling (the raw emulator free-running in one process per core), in one interleaved run."""
    from mario_a3c.bench_env import _Vector
    _against_ceiling({"processes, double-buffered": _Vector(8, "async", "simple", 0, groups=2, **_TWO_WORKERS),
                      "threads, double-buffered": _Vector(8, "threads", "simple", 0, groups=2)})


def worker_threads():
    """The double-buffered vector env (8 envs, 2 groups) in two single-threaded worker processes, in one worker process
    with two threads (the default), and in env threads of this process, against the machine's ceiling, in one run."""
    from mario_a3c.bench_env import _Vector
    _against_ceiling({"2 processes, 1 thread each": _Vector(8, "async", "simple", 0, groups=2, **_TWO_WORKERS),
                      "1 process, 2 threads": _Vector(8, "async", "simple", 0, groups=2, num_workers=1, worker_threads=2),
                      "threads in this process": _Vector(8, "threads", "simple", 0, groups=2)})


def retry_snapshots():
    """`retry_starts` snapshots the emulator every `retry_every` frames on the ground (default 4) and loads one at some
    resets: its cost, on 1-4 with the 1-4 recipe's preprocessing and a random policy, without and with retries at the
    current defaults, in one interleaved run."""
    from mario_a3c.bench_env import _Single
    from mario_a3c.config import TrainingConfig
    from mario_a3c.envs import make_env
    kw = TrainingConfig.from_json("mario_a3c/configs/world1_stage4_sticky7.json").env_kwargs()
    defaults = {"retry_span": TrainingConfig.retry_span, "retry_every": TrainingConfig.retry_every}
    benches = {p: _Single(make_env(**{**kw, **defaults, "retry_starts": p}), seed=0) for p in (0.0, 0.5)}
    m = _measure(benches, seconds=120, rounds=12)
    for p, v in m.items():
        print(f"retry_starts {p}: {v:6.0f} frames/s")
    print(f"ratio {m[0.5] / m[0.0]:.3f}")

def paired(runs=8, seconds=10.0):
    """The wrapper ratio measured two ways, `runs` times: raw and wrapped stepped in turn (one agent step each, each on
    its own clock, as `bench-env` does) and in separate slices (6 rounds of raw, then wrapped)."""
    from mario_a3c.bench_env import _Paired, _Single, _run_for, raw_env
    from mario_a3c.envs import make_env
    p = _Paired(raw_env(), make_env(1, 1), 0)
    raw, wrapped = p.raw, p.wrapped
    for i in range(runs):
        f0, s0 = {k: getattr(p, k).frames for k in p.seconds}, dict(p.seconds)
        _run_for(seconds, p.step)
        fps = {k: (getattr(p, k).frames - f0[k]) / (p.seconds[k] - s0[k]) for k in p.seconds}
        tot = {"raw": [0, 0.], "wrapped": [0, 0.]}
        for _ in range(6):
            for k, b in (("raw", raw), ("wrapped", wrapped)):
                f = b.frames
                tot[k][1] += _run_for(seconds / 12, b.step)
                tot[k][0] += b.frames - f
        sliced = (tot["wrapped"][0] / tot["wrapped"][1]) / (tot["raw"][0] / tot["raw"][1])
        print(f"run {i + 1}: paired {fps['wrapped'] / fps['raw']:.3f}   sliced {sliced:.3f}")
    p.close()


if __name__ == "__main__":
    names = [n for n, f in globals().items() if callable(f) and not n.startswith("_") and f.__module__ == "__main__"]
    if len(sys.argv) != 2 or sys.argv[1] not in names:
        print(__doc__, "\nexperiments:", ", ".join(names))
        sys.exit(2)
    globals()[sys.argv[1]]()
