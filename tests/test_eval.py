"""Evaluation end to end: the `mario-a3c eval` command on a tiny checkpoint, real MP4s, one-line errors, fp16 pretrained
agents, seeded no-op starts. Numbers are checked against independent references (a naive env loop, NumPy means)."""

import contextlib, io, json, os, re, shutil, subprocess, sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import mario_a3c.evaluate as ev
from mario_a3c.checkpoint import make_meta, meta_path, save_checkpoint
from mario_a3c.cli import main
from mario_a3c.config import TrainingConfig
from mario_a3c.envs import make_env
from mario_a3c.evaluate import (
    eval_env_kwargs,
    evaluate,
    export_pretrained,
    list_pretrained,
    load_agent,
    pretrained_path,
    tiny_checkpoint,
)
from mario_a3c.models import ImpalaActorCritic

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def run_cli(*args, check=True):
    res = subprocess.run(
        [str(BIN / "mario-a3c"), "eval", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def play(ckpt, **kw):
    "evaluate() plus the (episode, action, noop) of every step, seen through the callback."
    steps = []
    res = evaluate(
        ckpt,
        callback=lambda frame, info: steps.append((info["episode_index"], info["action"], info["noop"])),
        **kw,
    )
    return res, steps


def naive_replay(config, actions, seed, max_steps, world=None, stage=None):
    "Sum of rewards, steps, max x and flag of a plain loop over a fresh env playing `actions`."
    env = make_env(**eval_env_kwargs(config, world, stage, max_steps))
    _, info = env.reset(seed=seed)
    total, xs, flag, n = 0.0, [info["x_pos"]], False, 0
    for a in actions:
        _, r, term, trunc, info = env.step(a)
        total += r
        xs.append(info["x_pos"])
        flag = flag or info["flag_get"]
        n += 1
        if term or trunc:
            break
    env.close()
    assert term or trunc, "the replay did not end where the evaluation's episode ended"
    return dict(ret=total, length=n, max_x=max(xs), flag=flag)


def test_cli_table_and_json(ckpt):
    res = run_cli(
        "--checkpoint", ckpt, "--episodes", 2, "--max-steps", 30, "--noop-max", 5, "--seed", 1, "--json"
    )
    lines = res.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(out) >= {"episodes", "clear_rate"} and len(out["episodes"]) == 2
    assert out["clear_rate"] == pytest.approx(np.mean([e["flag"] for e in out["episodes"]]))
    assert lines[1].split() == ["episode", "return", "length", "max", "x", "flag"]
    for i, e in enumerate(out["episodes"]):  # the table rows say what the JSON says
        assert lines[2 + i].split() == [
            str(i + 1),
            f"{e['return']:.2f}",
            str(e["length"]),
            str(e["max_x"]),
            "yes" if e["flag"] else "no",
        ]
    assert lines[4].startswith(
        "clear rate 0/2" if not any(e["flag"] for e in out["episodes"]) else "clear rate "
    )
    # the command and the library play the same episodes
    lib = evaluate(ckpt, episodes=2, max_steps=30, noop_max=5, seed=1)
    assert lib["episodes"] == out["episodes"]
    # without --json: the table only
    rc, out, _ = run_main("--checkpoint", ckpt, "--episodes", 1, "--max-steps", 10)
    plain = out.strip().splitlines()
    assert plain[-1].startswith("clear rate") and not plain[-1].startswith("{")


def test_cli_ranks_several_checkpoints(ckpt, tmp_path):
    other = tiny_checkpoint(tmp_path / "seed3", seed=3)  # another network: it plays differently
    args = ("--episodes", 2, "--max-steps", 40, "--noop-max", 3, "--seed", 2)
    res = run_cli("--checkpoint", ckpt, other, *args, "--json")
    lines = res.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    # the reference: each checkpoint played on its own by the same command
    ref = {}
    for c in (ckpt, other):
        one = json.loads(run_cli("--checkpoint", c, *args, "--json").stdout.strip().splitlines()[-1])
        eps = one["episodes"]
        ref[one["checkpoint"]] = dict(
            clears=sum(e["flag"] for e in eps),
            mean_max_x=np.mean([e["max_x"] for e in eps]),
            mean_return=np.mean([e["return"] for e in eps]),
            frames=one["frames"],
        )
    assert sorted(r["checkpoint"] for r in out["ranking"]) == sorted(ref)
    for r in out["ranking"]:
        want = ref[r["checkpoint"]]
        assert (r["clears"], r["frames"]) == (want["clears"], want["frames"])
        assert (r["mean_max_x"], r["mean_return"]) == pytest.approx((want["mean_max_x"], want["mean_return"]))
    keys = [(-r["clear_rate"], -r["mean_max_x"], -r["mean_return"]) for r in out["ranking"]]
    assert keys == sorted(keys) and out["best"] == out["ranking"][0]["checkpoint"]
    table = lines[lines.index(next(l for l in lines if l.split()[:2] == ["rank", "clears"])) + 1 : -1]
    assert [l.split()[-1] for l in table] == [r["checkpoint"] for r in out["ranking"]]
    # a missing file among several stops the ranking with the one-line error that names it
    missing = tmp_path / "gone.pt"
    assert f"checkpoint {missing} does not exist" in one_error_line(
        "--checkpoint", ckpt, missing, process=True
    )


def test_returns_match_a_naive_loop(ckpt):
    _, config, _ = load_agent(ckpt)
    res, steps = play(ckpt, episodes=2, max_steps=40, noop_max=6, seed=2)
    for k, e in enumerate(res["episodes"]):
        acts = [a for ep, a, _ in steps if ep == k]
        ref = naive_replay(config, acts, seed=2 + k, max_steps=40)
        assert e["return"] == pytest.approx(ref["ret"])
        assert (e["length"], e["max_x"], e["flag"]) == (ref["length"], ref["max_x"], ref["flag"])
    assert res["clear_rate"] == pytest.approx(np.mean([e["flag"] for e in res["episodes"]]))


def test_other_stage(ckpt):
    stages = []
    res = evaluate(
        ckpt,
        episodes=1,
        max_steps=5,
        world=1,
        stage=2,
        callback=lambda f, i: stages.append((i["world"], i["stage"])),
    )
    assert (res["world"], res["stage"]) == (1, 2) and set(stages) == {(1, 2)}


def test_video_is_a_real_colour_video(ckpt, tmp_path):
    vdir = tmp_path / "videos"
    # sampled: the tiny network's argmax may stand still, and a video of a still screen cannot show it moves
    res = run_cli(
        "--checkpoint",
        ckpt,
        "--episodes",
        2,
        "--max-steps",
        20,
        "--noop-max",
        3,
        "--sample",
        "--seed",
        0,
        "--video",
        "--video-dir",
        vdir,
        "--json",
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(Path(v).name for v in out["videos"]) == sorted(p.name for p in vdir.glob("*.mp4"))
    assert len(out["videos"]) == 2
    for v, e in zip(out["videos"], out["episodes"]):
        frames = np.stack(list(iio.imiter(v)))  # [N, H, W, 3]
        assert frames.shape[1:] == (240, 256, 3) and frames.dtype == np.uint8
        assert frames.shape[0] == e["length"] + 1  # the reset frame and one per step
        assert 40 < frames.mean() < 230  # not black, not white
        assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 0.1  # moving, not one frame repeated
        r, g, b = frames[0].reshape(-1, 3).astype(int).T
        assert np.abs(r - b).mean() > 10  # colour, not gray


def test_sampling_and_noop_starts_are_seeded(ckpt):
    a, sa = play(ckpt, episodes=3, max_steps=25, noop_max=10, seed=7)
    b, sb = play(ckpt, episodes=3, max_steps=25, noop_max=10, seed=7)
    assert a["episodes"] == b["episodes"] and sa == sb
    rng = np.random.default_rng(7)
    want = [int(rng.integers(0, 11)) for _ in range(3)]
    assert [e["noops"] for e in a["episodes"]] == want
    assert [sum(n for ep, _, n in sa if ep == k) for k in range(3)] == want
    for k, n in enumerate(want):  # the agent's first action comes right after the no-ops
        noops = [nn for ep, _, nn in sa if ep == k]
        assert noops == [True] * n + [False] * (len(noops) - n)
    c, sc = play(ckpt, episodes=3, max_steps=25, noop_max=0, seed=7)
    assert [e["noops"] for e in c["episodes"]] == [0, 0, 0] and not any(n for _, _, n in sc)
    d, sd = play(ckpt, episodes=3, max_steps=25, noop_max=3, seed=7)  # another noop_max, another start
    assert [e["noops"] for e in d["episodes"]] != want and sd != sa
    s1, s2, s3 = (play(ckpt, episodes=1, max_steps=30, deterministic=False, seed=s)[1] for s in (4, 4, 5))
    assert s1 == s2 and s1 != s3


def test_callback_can_stop(ckpt):
    res = evaluate(ckpt, episodes=3, max_steps=50, callback=lambda f, i: i["step"] == 5)
    assert res["stopped"] and res["episodes"] == [] and res["clear_rate"] is None


def test_callback_frames_can_be_kept(ckpt):
    "Each step's frame is the screen of that step, still so after later steps (not a view the emulator reuses)."
    kept, fresh = [], []
    evaluate(ckpt, episodes=1, max_steps=40, callback=lambda f, i: kept.append(f) or fresh.append(f.copy()))
    assert len(kept) == 40 and all(np.array_equal(a, b) for a, b in zip(kept, fresh))
    assert len({f.tobytes() for f in kept}) > 10  # the screen scrolls and Mario moves


def copy_ckpt(ckpt, d):
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt, d / ckpt.name)
    shutil.copy(meta_path(ckpt), d / meta_path(ckpt).name)
    return d / ckpt.name


def run_main(*args):
    "`mario-a3c eval ARGS` in this process (the console script's `main`): (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["eval", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def one_error_line(*args, process=False):
    rc, _, err = (
        (lambda r: (r.returncode, r.stdout, r.stderr))(run_cli(*args, check=False))
        if process
        else run_main(*args)
    )
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("mario-a3c eval: error: ")
    return lines[0]


def test_errors_are_one_line_naming_the_file(ckpt, tmp_path):
    missing = tmp_path / "nowhere" / "a3c_world1_stage1_latest.pt"
    assert f"checkpoint {missing} does not exist" in one_error_line("--checkpoint", missing, process=True)

    nometa = copy_ckpt(ckpt, tmp_path / "nometa")
    meta_path(nometa).unlink()
    torch.save({"weights": torch.zeros(2)}, nometa)
    assert f"checkpoint {nometa} has no metadata file a3c_world1_stage1_latest.json" in one_error_line(
        "--checkpoint", nometa
    )

    def edited(name, edit):
        p = copy_ckpt(ckpt, tmp_path / name)
        m = json.loads(meta_path(p).read_text())
        edit(m)
        meta_path(p).write_text(json.dumps(m))
        return p

    old = edited("old", lambda m: m.update(format_version=99))
    assert f"checkpoint {old} has format_version=99" in one_error_line("--checkpoint", old)
    alien = copy_ckpt(ckpt, tmp_path / "alien")
    meta_path(alien).write_text('{"kind": "something else"}')
    assert "has no format_version: not a mario_a3c checkpoint" in one_error_line("--checkpoint", alien)
    garbled = copy_ckpt(ckpt, tmp_path / "garbled")
    meta_path(garbled).write_text("{not json")
    assert "is not valid JSON" in one_error_line("--checkpoint", garbled)
    newer = edited("newer", lambda m: m["config"].update(warp_drive=True))
    msg = one_error_line("--checkpoint", newer)
    assert str(newer) in msg and "unknown config key(s) warp_drive" in msg

    # the metadata describes another network than the weights: the .pt carries its own copy of the metadata, so both change
    wide = copy_ckpt(ckpt, tmp_path / "wide")
    payload = torch.load(wide, weights_only=True)
    payload["meta"]["config"]["hidden"] = 64
    torch.save(payload, wide)
    meta_path(wide).write_text(json.dumps(payload["meta"]))
    msg = one_error_line("--checkpoint", wide)
    assert f"checkpoint {wide} does not fit this model" in msg


def test_pretrained_missing_lists_what_is_available(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "PRETRAINED_DIR", tmp_path / "pretrained")
    rc, _, err = run_main("--pretrained", "1-1")
    assert rc == 2 and err.strip() == (
        f"mario-a3c eval: error: no pretrained agent for 1-1 "
        f"({tmp_path}/pretrained/a3c_world1_stage1.pt is missing); available: none"
    )
    export_pretrained(ckpt, log=None)
    assert (
        list_pretrained() == ["1-1"]
        and pretrained_path("1-1") == tmp_path / "pretrained" / "a3c_world1_stage1.pt"
    )
    rc, _, err = run_main("--pretrained", "4-2")
    assert rc == 2 and err.strip().endswith("a3c_world4_stage2.pt is missing); available: 1-1")
    rc, _, err = run_main("--pretrained", "9-1")
    assert rc == 2 and "world=9 is not a Super Mario Bros world" in err


def test_export_pretrained_roundtrip(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "PRETRAINED_DIR", tmp_path / "pretrained")
    logged = []
    dest = export_pretrained(ckpt, log=logged.append)
    assert (
        dest == tmp_path / "pretrained" / "a3c_world1_stage1.pt"
        and f"{dest.stat().st_size / 1e6:.2f} MB" in logged[0]
    )
    payload = torch.load(dest, weights_only=True)
    assert set(payload["state"]) == {"model"}  # no optimizer, RNG state, counters
    assert {v.dtype for v in payload["state"]["model"].values()} == {torch.float16}
    assert dest.stat().st_size < 0.6 * ckpt.stat().st_size
    meta = json.loads(meta_path(dest).read_text())
    trained = json.loads(meta_path(ckpt).read_text())["config"]
    assert {k: v for k, v in meta["config"].items() if k not in ev.LOCAL_FIELDS} == {
        k: v for k, v in trained.items() if k not in ev.LOCAL_FIELDS
    }
    assert (
        meta["config"]["runs_dir"] == TrainingConfig().runs_dir != trained["runs_dir"]
        and meta["run_name"] == ""
    )
    assert meta["weights_dtype"] == "float16"

    m32, config, _ = load_agent(ckpt)
    m16, _, _ = load_agent(dest)
    sd32 = m32.state_dict()
    for k, v in m16.state_dict().items():  # float32 again, each weight the float16 rounding of the original
        assert v.dtype == sd32[k].dtype and torch.equal(v, sd32[k].half().float())
    # logits on real frames agree to float16 precision
    env = make_env(**eval_env_kwargs(config))
    obs, _ = env.reset(seed=0)
    frames = []
    for t in range(40):
        obs, *_ = env.step([1, 1, 2, 0, 5][t % 5])
        frames.append(np.asarray(obs))
    env.close()
    x = torch.as_tensor(np.stack(frames))[:, None]  # [T, 1, C, H, W]
    start = torch.zeros(40, 1, dtype=torch.bool)
    start[0] = True
    with torch.no_grad():
        l32, _, _ = m32(x, m32.initial_state(1), start)
        l16, _, _ = m16(x, m16.initial_state(1), start)
    err = (l32 - l16).abs().max().item()
    assert err < 1e-2
    top2 = l32.topk(2, -1).values
    sure = (top2[..., 0] - top2[..., 1]) > 2 * err
    assert torch.equal(l16.argmax(-1)[sure], l32.argmax(-1)[sure])
    # the CLI plays the shipped copy; where no action is a near tie, the episodes are the fp32 ones
    rc, out, _ = run_main("--pretrained", "1-1", "--episodes", 1, "--max-steps", 30, "--json")
    assert rc == 0
    a16 = json.loads(out.strip().splitlines()[-1])
    assert a16["checkpoint"] == str(dest)
    r32, s32 = play(ckpt, episodes=1, max_steps=30)
    r16, s16 = play(dest, episodes=1, max_steps=30)
    assert a16["episodes"] == r16["episodes"]
    # both networks on the frames of the fp32 episode: the fp16 copy plays the same actions up to the first step where
    # its argmax differs, and that step can only be a near tie of the fp32 logits
    acts = [a for _, a, _ in s32]
    env = make_env(**eval_env_kwargs(config, max_steps=30))
    obs, _ = env.reset(seed=0)
    seen = [np.asarray(obs)]
    for a in acts[:-1]:
        obs, *_ = env.step(a)
        seen.append(np.asarray(obs))
    env.close()
    x = torch.as_tensor(np.stack(seen))[:, None]
    start = torch.zeros(len(seen), 1, dtype=torch.bool)
    start[0] = True
    with torch.no_grad():
        p32, _, _ = m32(x, m32.initial_state(1), start)
        p16, _, _ = m16(x, m16.initial_state(1), start)
    g32, g16 = p32[:, 0].argmax(-1).tolist(), p16[:, 0].argmax(-1).tolist()
    assert g32 == acts  # the evaluation acted by argmax on exactly these frames
    k = next((t for t in range(len(acts)) if g16[t] != g32[t]), len(acts))
    assert [a for _, a, _ in s16][: k + 1] == g16[
        : k + 1
    ]  # the fp16 episode: the same, then its own choice at step k
    same_play = k == len(acts)  # no step where the two networks choose differently
    assert (s16 == s32) == same_play and (r16["episodes"] == r32["episodes"] or not same_play)
    for t in range(len(acts)):
        if g16[t] != g32[t]:
            top2 = p32[t, 0].topk(2).values
            assert top2[0] - top2[1] <= 2 * (p32[t] - p16[t]).abs().max(), t  # a tie within float16 rounding


def test_full_size_agent_ships_under_10_mb(tmp_path):
    cfg = TrainingConfig(checkpoint_dir=str(tmp_path))
    model = ImpalaActorCritic(**cfg.model_kwargs())
    src = save_checkpoint(tmp_path / "run", 1, 1, "best", {"model": model.state_dict()}, make_meta(cfg, 0, 0))
    dest = export_pretrained(src, tmp_path / "pretrained", log=None)
    n = sum(p.numel() for p in model.parameters())
    assert dest.stat().st_size < 10e6 and dest.stat().st_size == pytest.approx(2 * n, rel=0.05)
    m, _, _ = load_agent(dest)
    assert sum(p.numel() for p in m.parameters()) == n


ROOT = Path(__file__).resolve().parents[1]


def test_shipped_world1_1_agent_clears_the_stage():
    "The agent inside the package plays argmax episodes from random no-op starts and reaches the flag in each."
    res = run_cli("--pretrained", "1-1", "--episodes", 2, "--noop-max", 30, "--seed", 3, "--json")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    shipped = Path(out["checkpoint"])
    assert (
        shipped == ROOT / "mario_a3c" / "pretrained" / "a3c_world1_stage1.pt"
        and shipped.stat().st_size < 10e6
    )
    assert [(e["flag"], e["max_x"]) for e in out["episodes"]] == [(True, 3161)] * 2, out["episodes"]
    assert len({e["noops"] for e in out["episodes"]}) == 2  # two different starts, not one episode twice
    meta = json.loads(meta_path(shipped).read_text())
    assert meta["weights_dtype"] == "float16" and meta["config"]["repress_jump"] is True


def test_shipped_world1_1_agent_plays_under_sticky_actions():
    "Under ALE's sticky actions every episode's timing differs: the agent takes a different path each time and clears."
    res = run_cli(
        "--pretrained", "1-1", "--episodes", 4, "--sticky", 0.25, "--noop-max", 30, "--seed", 0, "--json"
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["sticky"] == 0.25 and out["distinct_paths"] == 4, out
    assert [(e["flag"], e["max_x"]) for e in out["episodes"]] == [(True, 3161)] * 4, out["episodes"]


def test_a_plain_install_carries_the_shipped_agent(tmp_path):
    "Build a wheel from the sources, install it into an empty folder: `pretrained_path('1-1')` finds the agent there."
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "settings.ini", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mario_a3c", src / "mario_a3c", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "nbs").mkdir()
    shutil.copy(ROOT / "nbs" / "train.ipynb", src / "nbs" / "train.ipynb")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (whl,) = (tmp_path / "dist").glob("mario_a3c-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", tmp_path / "site", whl],
        check=True,
        capture_output=True,
        timeout=600,
    )
    code = "from mario_a3c.evaluate import pretrained_path, list_pretrained; print(pretrained_path('1-1')); print(list_pretrained())"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    path, names = r.stdout.strip().splitlines()[-2:]
    shipped = sorted(
        "{}-{}".format(*re.fullmatch(r"a3c_world(\d+)_stage(\d+)\.pt", p.name).groups())
        for p in (ROOT / "mario_a3c" / "pretrained").glob("*.pt")
    )
    assert (
        Path(path) == tmp_path / "site" / "mario_a3c" / "pretrained" / "a3c_world1_stage1.pt"
        and names == str(shipped)
        and "1-1" in shipped
    )
    assert (
        Path(path).read_bytes() == (ROOT / "mario_a3c" / "pretrained" / "a3c_world1_stage1.pt").read_bytes()
    )
    # the train notebook comes with it, so `tune --execution papermill` works outside a checkout
    code = "from mario_a3c.tune_papermill import train_notebook; print(train_notebook())"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert (
        Path(r.stdout.strip().splitlines()[-1])
        == tmp_path / "site" / "mario_a3c" / "notebooks" / "train.ipynb"
    )
