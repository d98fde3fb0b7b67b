"""The main job through its front doors: the `mario-a3c` command and papermill, as real processes.

Tiny networks and a few updates: these tests check plumbing (flags, files, counters, errors), never learning progress.
"""

import json, os, subprocess, sys
from pathlib import Path

import pytest
from states import same

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = (
    '--num-envs 2 --rollout-steps 4 --channels 4,8 --hidden 32 --core-size 32 --vectorization sync '
    '--mode sync --no-compile --warmup-updates 1 --log-every-s 0'
).split()


def run_cli(*args, cwd=ROOT, check=True):
    res = subprocess.run(
        [str(BIN / "mario-a3c"), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def out_dirs(tmp):
    return [
        "--runs-dir",
        str(tmp / "runs"),
        "--checkpoint-dir",
        str(tmp / "ckpt"),
        "--tensorboard-dir",
        str(tmp / "tb"),
    ]


def metrics(run_dir, kind="update"):
    lines = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [l for l in lines if l.get("kind") == kind]


# every core, both return estimators and replay on/off, covered pairwise in four runs
@pytest.mark.parametrize(
    "core,returns,per",
    [
        ("gru", "vtrace", True),
        ("lstm", "gae", False),
        ("transformer", "vtrace", False),
        ("none", "gae", True),
    ],
)
def test_cli_trains_each_core(tmp_path, core, returns, per):
    extra = ["--per", "--per-warmup", "1", "--per-batch", "2"] if per else ["--no-per"]
    res = run_cli(
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "3",
        "--recurrent-type",
        core,
        "--returns",
        returns,
        "--run-name",
        "t",
        *extra,
    )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["stopped"] == "done" and summary["updates"] == 3
    assert summary["frames"] == 3 * 2 * 4 * 4  # updates * envs * rollout steps * frame skip
    ckpt = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert {"config", "immutable", "versions", "updates", "frames", "best_avg_return", "saved_at"} <= set(
        meta
    )
    assert (
        meta["config"]["recurrent_type"] == core
        and meta["config"]["returns"] == returns
        and meta["updates"] == 3
    )
    assert [m["update"] for m in metrics(tmp_path / "runs" / "t")] == [1, 2, 3]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_time_budget_ends_a_run_with_a_checkpoint(tmp_path):
    """`--max-minutes` stops a run that `--total-updates` would keep going: exit 0, a checkpoint, `stopped` says why."""
    res = run_cli(
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "100000",
        "--max-minutes",
        "0.05",
        "--run-name",
        "b",
    )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["stopped"] == "time" and 1 <= summary["updates"] < 100000 and summary["wall_s"] >= 3, (
        summary
    )
    meta = json.loads((tmp_path / "ckpt" / "a3c_world1_stage1_latest.json").read_text())
    assert meta["updates"] == summary["updates"] and meta["config"]["max_minutes"] == 0.05


def test_held_buttons_sticky_actions_and_repress_jump_train_then_evaluate(tmp_path):
    """The planes widen the network's input: training, the checkpoint and evaluation must agree on it."""
    run_cli(
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "2",
        "--run-name",
        "h",
        "--no-gray",
        "--held-buttons",
        "--sticky-actions",
        "0.25",
        "--repress-jump",
    )
    ckpt = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["config"]["held_buttons"] is True and meta["config"]["sticky_actions"] == 0.25
    assert meta["immutable"]["held_buttons"] is True and meta["immutable"]["repress_jump"] is True
    res = run_cli("eval", "--checkpoint", str(ckpt), "--episodes", "1", "--max-steps", "20", "--json")
    assert json.loads(res.stdout.strip().splitlines()[-1])["episodes"][0]["length"] == 20


def test_self_imitation_async_keeps_episodes_across_a_resume(tmp_path):
    """Async actors' episodes reach the memory whole; a stopped run saves it and the resumed run starts from it."""
    run_cli(
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "6",
        "--run-name",
        "s",
        "--mode",
        "async",
        "--actors",
        "2",
        "--recurrent-type",
        "none",
        "--sil",
        "--sil-batch",
        "4",
        "--max-episode-steps",
        "6",
    )
    ckpt = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    last = metrics(tmp_path / "runs" / "s")[-1]
    episodes = metrics(tmp_path / "runs" / "s", "episode")
    assert last["sil/episodes"] == len(episodes) and last["sil/size"] == sum(e["l"] for e in episodes), (
        last,
        episodes,
    )
    assert (tmp_path / "ckpt" / "a3c_world1_stage1_latest.sil.npz").exists()
    res = run_cli("train", "--resume", str(ckpt), "--total-updates", "7")
    assert f"self-imitation memory: {len(episodes)} episodes" in res.stdout + res.stderr, res.stdout[-2000:]


def test_resume_continues_counters_and_curves(tmp_path):
    run_cli("train", *TINY, *out_dirs(tmp_path), "--total-updates", "2", "--run-name", "r")
    ckpt = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    res = run_cli("train", "--resume", str(ckpt), "--total-updates", "4")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["updates"] == 4 and summary["frames"] == 4 * 2 * 4 * 4
    assert [m["update"] for m in metrics(tmp_path / "runs" / "r")] == [1, 2, 3, 4]
    frames = [m["frames"] for m in metrics(tmp_path / "runs" / "r")]
    assert frames == sorted(frames) and len(set(frames)) == 4


def test_resume_restores_weights_optimizer_rng_and_best_score(tmp_path):
    """`--resume` brings back the whole state: a resumed run with no update left saves exactly what it loaded."""
    import torch

    run_cli(
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "3",
        "--run-name",
        "b",
        "--avg-window",
        "2",
        "--max-episode-steps",
        "4",
        "--checkpoint-every",
        "10",
        "--per",
        "--per-warmup",
        "1",
        "--per-batch",
        "2",
    )
    ckpt = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    before = torch.load(ckpt, weights_only=True)
    state = before["state"]
    assert state["best_avg_return"] is not None and len(state["window"]) == 2  # a best score to carry over
    assert state["learner"]["optimizer"]["state"][0]["exp_avg_sq"].abs().sum() > 0 and "numpy" in state["rng"]
    res = run_cli("train", "--resume", str(ckpt), "--total-updates", "3")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["updates"], summary["best_avg_return"]) == (3, state["best_avg_return"])
    after = torch.load(ckpt, weights_only=True)
    assert after["meta"]["save_id"] != before["meta"]["save_id"]  # written again, by the resumed process
    for k in state:  # weights, optimizer and schedule, RNG streams, counters, episode window, best score
        assert same(after["state"][k], state[k]), k
    assert after["state"].keys() == state.keys()


def test_conflicting_resume_override_is_refused(tmp_path):
    run_cli(
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "1",
        "--run-name",
        "c",
        "--recurrent-type",
        "lstm",
    )
    ckpt = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    res = run_cli("train", "--resume", str(ckpt), "--recurrent-type", "gru", check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "mario-a3c train: error: cannot resume with recurrent_type='gru': checkpoint a3c_world1_stage1_latest.pt "
        "was trained with recurrent_type='lstm' (immutable)"
    ]


def test_corrupt_checkpoint_gives_one_line(tmp_path):
    run_cli("train", *TINY, *out_dirs(tmp_path), "--total-updates", "1", "--run-name", "k")
    ckpt = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a torn write of the weights
    res = run_cli("train", "--resume", str(ckpt), check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "a3c_world1_stage1_latest.pt" in lines[0], res.stderr
    ckpt.with_suffix(".json").write_text("{}")  # metadata from something else
    res = run_cli("train", "--resume", str(ckpt), check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "a3c_world1_stage1_latest.json" in lines[0], res.stderr


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--world", "9", "world=9 is not a Super Mario Bros world: allowed 1-8"),
        ("--lr", "-1", "lr=-1.0 is out of range"),
    ],
)
def test_bad_flag_value_gives_one_line(tmp_path, flag, value, msg):
    res = run_cli("train", *out_dirs(tmp_path), flag, value, check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], res.stderr


def test_config_out_then_config_in(tmp_path):
    cfg = tmp_path / "run.json"
    run_cli(
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "1",
        "--run-name",
        "a",
        "--config-out",
        str(cfg),
        "--dry-run",
    )
    assert (
        json.loads(cfg.read_text())["channels"] == "4,8" and not (tmp_path / "runs").exists()
    )  # exported, not trained
    res = run_cli("train", "--config", str(cfg), "--run-name", "b", "--total-updates", "2")
    assert json.loads(res.stdout.strip().splitlines()[-1])["updates"] == 2
    assert json.loads((tmp_path / "runs" / "b" / "config.json").read_text())["channels"] == "4,8"


@pytest.mark.parametrize("cwd", [".", "nbs"])
def test_papermill_train_notebook(tmp_path, cwd):
    out = tmp_path / "train-out.ipynb"
    params = dict(
        total_updates=2,
        warmup_updates=1,
        num_envs=2,
        rollout_steps=4,
        channels="4,8",
        hidden=32,
        core_size=32,
        compile=False,
        vectorization="sync",
        runs_dir=str(tmp_path / "runs"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        tensorboard_dir=str(tmp_path / "tb"),
        run_name="pm",
    )
    args = [str(BIN / "papermill"), str(ROOT / "nbs" / "train.ipynb"), str(out), "-k", "python3"]
    for k, v in params.items():
        args += ["-p", k, str(v)] if not isinstance(v, str) else ["-r", k, v]
    env = {**os.environ}
    env.pop("IN_TEST", None)  # a real run of the notebook, not its test-size version
    res = subprocess.run(args, cwd=ROOT / cwd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [m["update"] for m in metrics(tmp_path / "runs" / "pm")] == [1, 2]
    assert (tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt").exists()
    nb = json.loads(out.read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])


def test_train_notebook_parameters_match_the_config():
    from mario_a3c.config import parameters_cell_source

    nb = json.loads((ROOT / "nbs" / "train.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assert parameters_cell_source().strip() in "".join(cell["source"])


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
    """A long run stopped by `kill` (e.g. the end of a session) leaves a checkpoint that resumes where it stopped."""
    import signal, time

    args = [
        str(BIN / "mario-a3c"),
        "train",
        *TINY,
        *out_dirs(tmp_path),
        "--total-updates",
        "100000",
        "--run-name",
        "s",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "runs" / "s" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        metrics_file.exists() and '"update"' in metrics_file.read_text()
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "interrupted" and summary["updates"] >= 1
    meta = json.loads((tmp_path / "ckpt" / "a3c_world1_stage1_latest.json").read_text())
    assert meta["updates"] == summary["updates"]
    res = run_cli(
        "train",
        "--resume",
        str(tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"),
        "--total-updates",
        str(summary["updates"] + 1),
    )
    assert json.loads(res.stdout.strip().splitlines()[-1])["updates"] == summary["updates"] + 1


def test_wandb_offline_run_records_metrics(tmp_path):
    """`--wandb-project` with the offline mode works without network and records the run's metric names."""
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_SILENT": "true"}
    res = subprocess.run(
        [
            str(BIN / "mario-a3c"),
            "train",
            *TINY,
            *out_dirs(tmp_path),
            "--total-updates",
            "2",
            "--run-name",
            "w",
            "--wandb-project",
            "mario-test",
            "--wandb-mode",
            "offline",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "runs" / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for key in (b"losses/total", b"losses/entropy", b"perf/fps", b"mario-test"):
        assert key in data, key
