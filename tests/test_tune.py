"""Hyperparameter search end to end: `mario-a3c tune` in both execution modes, resuming, failing and pruned trials.

Tiny networks and a few updates: these tests check plumbing (storage, files, states, errors), never tuning quality.
"""

import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")
from mario_a3c.config import TrainingConfig
from mario_a3c.tune import Dim, open_study
from mario_a3c.tune_report import run_study
import tiny

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# in process (sync): a trial whose lr blows up fails with the sampler's own error, which the tests look for
TINY_FLAGS = [*tiny.TINY_FLAGS, *'--mode sync --max-episode-steps 8 --log-every-s 600 --total-updates 4'.split()]
TINY = TrainingConfig(
    mode='sync',
    total_updates=4,
    warmup_updates=1,
    num_envs=2,
    rollout_steps=4,
    vectorization="sync",
    channels="4,8",
    hidden=32,
    core_size=32,
    compile=False,
    max_episode_steps=8,
    log_every_s=600.0,
)
SPACE = {"lr": Dim(1e-5, 1e31, log=True)}  # wide enough to hold an enqueued lr that blows up


def run_cli(*args, check=True):
    res = subprocess.run(
        [str(BIN / "mario-a3c"), *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def load(tune_dir, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tune_dir / name / 'study.db'}")


def objective_from_file(trial, last=3):
    """The mean return of the last episodes, straight from the trial's metrics file."""
    lines = [
        json.loads(l) for l in (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    return float(np.mean([l["r"] for l in lines if l["kind"] == "episode"][-last:]))


def tune_flags(tmp, study):
    # a space that keeps the runs tiny (the default one tunes rollout_steps up to 64); no pruning here (the median
    # pruner would prune some tiny trials): pruning has its own tests below
    space = tmp / "space.json"
    space.write_text(
        json.dumps(
            {"lr": {"low": 1e-4, "high": 1e-3, "log": True}, "entropy_beta": {"low": 1e-3, "high": 0.05}}
        )
    )
    return [
        "--study",
        study,
        "--space",
        str(space),
        "--tune-dir",
        str(tmp / "tune"),
        "--last-episodes",
        "3",
        "--pruner",
        "none",
        "--runs-dir",
        str(tmp / "runs"),
        "--checkpoint-dir",
        str(tmp / "ckpt"),
        "--tensorboard-dir",
        str(tmp / "tb"),
        *TINY_FLAGS,
    ]


def test_cli_inprocess_study_resumes_and_best_config_trains(tmp_path):
    res = run_cli("tune", "--trials", "2", *tune_flags(tmp_path, "ip"))
    folder = tmp_path / "tune" / "ip"
    study = load(tmp_path / "tune", "ip")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        assert t.value == pytest.approx(objective_from_file(t))
    assert "best return" in res.stdout and any(
        l.split()[:3] == ["#", "state", "value"] for l in res.stdout.splitlines()
    )
    assert {p.name for p in folder.iterdir()} >= {
        "study.db",
        "best_config.json",
        "trials.txt",
        "history.png",
        "importances.png",
    }
    assert (folder / "history.png").read_bytes()[:4] == b"\x89PNG"
    # the best config loads back into `train`, with the best trial's values
    best = json.loads((folder / "best_config.json").read_text())
    assert best["lr"] == study.best_params["lr"] and best["runs_dir"] == str(tmp_path / "runs")
    out = run_cli(
        "train", "--config", str(folder / "best_config.json"), "--run-name", "best", "--total-updates", "1"
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["updates"] == 1
    assert json.loads((tmp_path / "runs" / "best" / "config.json").read_text())["lr"] == best["lr"]
    # an interrupted process leaves a RUNNING trial: resuming marks it failed and adds new trials after it
    open_study("ip", tmp_path / "tune").ask()
    run_cli("tune", "--trials", "1", *tune_flags(tmp_path, "ip"))
    study = load(tmp_path / "tune", "ip")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2].user_attrs["error"].startswith("interrupted")
    assert study.trials[3].params["lr"] not in {
        t.params.get("lr") for t in study.trials[:2]
    }  # not a replay of trial 0


def test_cli_papermill_study_saves_each_notebook(tmp_path):
    run_cli(
        "tune", "--trials", "2", "--execution", "papermill", "--timeout", "600", *tune_flags(tmp_path, "pm")
    )
    folder = tmp_path / "tune" / "pm"
    study = load(tmp_path / "tune", "pm")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        assert t.value == pytest.approx(objective_from_file(t))
        nb = json.loads((folder / f"trial-{t.number}.ipynb").read_text())
        injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
        assert f"lr = {t.params['lr']!r}" in "".join(injected["source"])
    # the study resumed: a trial whose notebook fails (NaN logits) is recorded with the notebook's error
    open_study("pm", tmp_path / "tune").enqueue_trial({"lr": 1e30})
    st = run_study(
        TINY,
        1,
        "pm",
        tmp_path / "tune",
        SPACE,
        execution="papermill",
        last_episodes=3,
        timeout_s=600,
        pruner="none",
    )
    assert [t.state.name for t in st.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert st.trials[2].user_attrs["error"].startswith("RuntimeError: probability tensor contains")
    assert (folder / "trial-2.ipynb").exists()


def test_failing_trials_are_recorded_and_the_study_continues(tmp_path):
    st = open_study("f", tmp_path)
    st.enqueue_trial({"lr": 1e30})
    st.enqueue_trial({"lr": 3e-4})
    st = run_study(TINY, 2, "f", tmp_path, SPACE, last_episodes=3, pruner="none")
    assert [t.state.name for t in st.trials] == ["FAIL", "COMPLETE"]
    assert st.trials[0].user_attrs["error"].startswith("RuntimeError: probability tensor contains")

    def nan_run(config, reporter, out, timeout_s):  # a run whose episodes all score NaN
        config.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        config.metrics_path.write_text(
            json.dumps({"kind": "episode", "r": float("nan"), "x": 1, "flag": False}) + "\n"
        )

    st = run_study(TINY, 1, "f", tmp_path, SPACE, runner=nan_run)
    assert st.trials[2].state.name == "FAIL" and "objective return=nan" in st.trials[2].user_attrs["error"]
    st = run_study(TINY, 1, "f", tmp_path, {"lr": Dim(1e-4, 1e-3, log=True)}, last_episodes=3, pruner="none")
    assert st.trials[3].state.name == "COMPLETE" and len(st.trials) == 4


class PruneAfter(optuna.pruners.BasePruner):
    """Prune every trial at its second report: makes the kill path deterministic."""

    def prune(self, study, trial):
        return trial.last_step is not None and trial.last_step >= 2


@pytest.mark.parametrize("execution", ["inprocess", "papermill"])
def test_pruned_trial_stops_early(tmp_path, execution):
    import psutil

    def ours():  # our descendants, less multiprocessing's helper processes (they live as long as this process)
        return {
            p.pid
            for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE
            and not any(k in " ".join(p.cmdline()) for k in ("resource_tracker", "forkserver"))
        }

    before = ours()
    long = TrainingConfig(**{**TINY.to_dict(), "total_updates": 100000})
    st = run_study(
        long,
        1,
        "p",
        tmp_path,
        {"lr": Dim(1e-4, 1e-3, log=True)},
        execution=execution,
        pruner=PruneAfter(),
        timeout_s=600,
    )
    t = st.trials[0]
    assert t.state.name == "PRUNED" and max(t.intermediate_values) >= 2
    updates = [
        json.loads(l)["update"]
        for l in (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        if '"kind": "update"' in l
    ]
    assert max(updates) < 200, max(updates)  # stopped right after the prune, nowhere near 100000 updates
    assert ours() <= before, ours() - before  # no papermill, kernel or worker process survives a pruned trial
    if execution == "papermill":
        assert (tmp_path / "p" / "trial-0.ipynb").exists()


def test_bad_tune_arguments_give_one_line(tmp_path):
    res = run_cli("tune", "--tune-dir", str(tmp_path), "--study", "a/b", check=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "mario-a3c tune: error: study='a/b' must be a folder name: letters, digits and _ . + = -"
    ]
    (tmp_path / "space.json").write_text(json.dumps({"nope": {"low": 0, "high": 1}}))
    res = run_cli("tune", "--tune-dir", str(tmp_path), "--space", str(tmp_path / "space.json"), check=False)
    assert res.returncode == 2 and "'nope' is not a TrainingConfig field" in res.stderr
