"""Faults and bad input through the front doors, as real processes: nothing the user made is lost or overwritten, and a
bad value gets one line that names it."""

import json, os, signal, subprocess, sys, textwrap
from pathlib import Path

from tiny import TINY_FLAGS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [*TINY_FLAGS, *'--log-every-s 0'.split()]


def cli(*args, cwd=ROOT):
    return subprocess.run(
        [str(BIN / "mario-a3c"), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def dirs(tmp):
    return [
        "--runs-dir",
        str(tmp / "runs"),
        "--checkpoint-dir",
        str(tmp / "ckpt"),
        "--tensorboard-dir",
        str(tmp / "tb"),
    ]


def test_a_second_run_does_not_replace_the_first(tmp_path):
    "A new run in the same folders refuses with one line that offers --resume and --overwrite; --overwrite replaces."
    first = cli("train", *TINY, *dirs(tmp_path), "--total-updates", "2", "--run-name", "a")
    assert first.returncode == 0, first.stderr[-2000:]
    latest = tmp_path / "ckpt" / "a3c_world1_stage1_latest.pt"
    kept = {p: p.read_bytes() for p in (latest, tmp_path / "runs" / "a" / "metrics.jsonl")}
    second = cli("train", *TINY, *dirs(tmp_path), "--total-updates", "2", "--run-name", "b")
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"--resume {latest}" in second.stderr and "--overwrite" in second.stderr
    same_name = cli(
        "train",
        *TINY,
        *dirs(tmp_path)[:2],
        "--checkpoint-dir",
        str(tmp_path / "other"),
        "--total-updates",
        "2",
        "--run-name",
        "a",
    )
    assert same_name.returncode == 2 and "runs/a/metrics.jsonl belongs to an earlier run" in same_name.stderr
    assert {p: p.read_bytes() for p in kept} == kept
    again = cli("train", *TINY, *dirs(tmp_path), "--total-updates", "2", "--run-name", "b", "--overwrite")
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["updates"] == 2
    reused = cli("train", *TINY, *dirs(tmp_path), "--total-updates", "3", "--run-name", "a", "--overwrite")
    assert reused.returncode == 0, reused.stderr[-2000:]
    lines = [json.loads(l) for l in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in lines if r["kind"] == "update"] == [
        1,
        2,
        3,
    ]  # replaced, not appended to the first run's
    assert len(list((tmp_path / "tb" / "a").glob("events.out.tfevents.*"))) == 1


def test_resume_names_what_is_wrong(tmp_path):
    "--resume of a folder, of metadata without a config, of a state without counters: one line each, exit 2."
    assert cli("train", *TINY, *dirs(tmp_path), "--total-updates", "1", "--run-name", "r").returncode == 0
    ckpt = tmp_path / "ckpt"
    res = cli("train", "--resume", str(ckpt))
    assert res.returncode == 2 and res.stderr.strip() == (
        f"mario-a3c train: error: checkpoint {ckpt} is a folder: give one of "
        "its .pt files (found: a3c_world1_stage1_best.pt, a3c_world1_stage1_latest.pt)"
        if (ckpt / "a3c_world1_stage1_best.pt").exists()
        else f"mario-a3c train: error: checkpoint {ckpt} is a folder: give one of "
        "its .pt files (found: a3c_world1_stage1_latest.pt)"
    ), res.stderr
    meta = ckpt / "a3c_world1_stage1_latest.json"
    good = meta.read_text()
    meta.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "config"}))
    res = cli("train", "--resume", str(ckpt / "a3c_world1_stage1_latest.pt"))
    assert (
        res.returncode == 2
        and res.stderr.strip()
        == f"mario-a3c train: error: checkpoint metadata {meta} has no config object (config=None)"
    )
    meta.write_text(good)
    code = textwrap.dedent(f"""
        import torch
        p = {str(ckpt / 'a3c_world1_stage1_latest.pt')!r}
        d = torch.load(p, weights_only=True); del d['state']['counters']; torch.save(d, p)""")
    subprocess.run([sys.executable, "-c", code], check=True)
    res = cli("train", "--resume", str(ckpt / "a3c_world1_stage1_latest.pt"))
    assert (
        res.returncode == 2
        and "cannot be resumed: its state has no counters" in res.stderr
        and res.stderr.count("\n") == 1
    )


def test_papermill_shows_the_bad_parameter_first(tmp_path):
    "papermill nbs/train.ipynb -p world 9: the one-line error reaches the terminal before papermill's traceback."
    for name, value, msg in [
        ("world", "9", "train.ipynb: world=9 is not a Super Mario Bros world: allowed 1-8"),
        ("total_updates", "-3", "train.ipynb: total_updates=-3 is out of range: allowed >= 1"),
    ]:
        res = subprocess.run(
            [str(BIN / "papermill"), "nbs/train.ipynb", str(tmp_path / "out.ipynb"), "-p", name, value],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = res.stderr.replace("\r", "\n").splitlines()
        assert res.returncode != 0 and msg in lines, res.stderr[-2000:]
        first_traceback = next(i for i, l in enumerate(lines) if l.startswith("Traceback"))
        assert lines.index(msg) < first_traceback


KILL_DURING_REWRITE = """
import json, os, signal, sys, threading
from types import SimpleNamespace
from mario_a3c.callbacks import JsonlLogger
from mario_a3c.config import TrainingConfig
path = sys.argv[1]
def audit(event, args):   # the first file opened for writing in the run folder: die 5 ms later, mid-write
    if event != 'open' or not str(args[0]).startswith(os.path.dirname(path)): return
    if 'w' in str(args[1] or '') or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR)):
        threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()
sys.addaudithook(audit)
t = SimpleNamespace(config=TrainingConfig(run_name='k'), updates=int(sys.argv[2]), frames=0)
JsonlLogger(path).on_train_begin(t)
"""


def test_a_kill_while_resume_rewrites_the_metrics_loses_nothing(tmp_path):
    "kill -9 while a resumed run drops the metrics after its checkpoint: the file is the old one or the new one, never cut."
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    rows = [
        json.dumps({"kind": "update", "update": u, "frames": u * 1024, "pad": "x" * 200})
        for u in range(1, 200_001)
    ]
    path.write_text("\n".join(rows) + "\n")
    old = path.read_bytes()
    res = subprocess.run(
        [sys.executable, "-c", KILL_DURING_REWRITE, str(path), "150000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]  # it did die mid-rewrite
    now = path.read_bytes()
    assert now == old or now == "".join(r + "\n" for r in rows[:150_000]).encode(), (len(old), len(now))
    resume = KILL_DURING_REWRITE.replace("sys.addaudithook(audit)", "")
    subprocess.run(
        [sys.executable, "-c", resume, str(path), "150000"], check=True, timeout=300
    )  # resumed again, unkilled
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]  # no temporary file left behind
    assert path.read_bytes() == "".join(r + "\n" for r in rows[:150_000]).encode()


LOCAL_RAY = """
import psutil, sys, tempfile
import ray   # imported first, as a notebook that used Ray before would have
from mario_a3c.ray_backend import local_ray_init
tmp = tempfile.mkdtemp(prefix='ray')
local_ray_init(num_cpus=1, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
try:
    ours = {p.pid for p in psutil.process_iter(['cmdline']) if tmp in ' '.join(p.info['cmdline'] or [])} | {psutil.Process().pid}
    ours |= {c.pid for p in list(ours) for c in psutil.Process(p).children(recursive=True)}
    print(sorted({c.laddr.ip for c in psutil.net_connections('inet') if c.status == 'LISTEN' and c.pid in ours}))
finally: ray.shutdown()
"""


def test_a_local_ray_listens_on_loopback_only():
    "The CLI's own `ray.init()` (no --ray-address): every socket its processes listen on is a loopback address."
    res = subprocess.run([sys.executable, "-c", LOCAL_RAY], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    addrs = json.loads(res.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert addrs and all(a in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for a in addrs), addrs


def test_unwritable_video_folder_is_one_line_before_playing(tmp_path):
    "`eval --video --video-dir` that cannot be written: one line naming the setting, exit 2, nothing played."
    (tmp_path / "file").write_text("x")
    res = cli(
        "eval",
        "--pretrained",
        "1-1",
        "--episodes",
        "1",
        "--video",
        "--video-dir",
        str(tmp_path / "file" / "videos"),
    )
    assert res.returncode == 2 and res.stdout == "", res.stdout[-500:]
    assert (
        res.stderr.strip()
        == f"mario-a3c eval: error: video_dir='{tmp_path}/file/videos' is not writable: Not a directory"
    )


def test_the_readme_short_papermill_run_needs_no_warmup_value(tmp_path):
    "`papermill nbs/train.ipynb OUT -p total_updates 2` (the README's example) runs: the warm-up shortens to the run."
    res = subprocess.run(
        [
            str(BIN / "papermill"),
            "nbs/train.ipynb",
            str(tmp_path / "out.ipynb"),
            "-p",
            "total_updates",
            "2",
            "-p",
            "runs_dir",
            str(tmp_path / "runs"),
            "-p",
            "checkpoint_dir",
            str(tmp_path / "ckpt"),
            "-p",
            "tensorboard_dir",
            str(tmp_path / "tb"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
