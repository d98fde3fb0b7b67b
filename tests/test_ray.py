"""Ray backend: a tiny asynchronous run through a two-node Ray cluster on loopback (head + worker, one CPU each).

The cluster has its own home, temporary folder and settings, so a `~/.ray` or `/tmp/ray` of another Ray run on this
machine does not matter, and only the processes it started are stopped afterwards."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from mario_a3c.callbacks import Callback
from mario_a3c.config import TrainingConfig
from mario_a3c.testing import CountingEnv
from mario_a3c.trainer import Trainer
from tiny import BEFORE_RECIPE, QUICK, TINY_NET, outputs

ray = pytest.importorskip('ray')
RAY = str(Path(sys.executable).with_name('ray'))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ray_cli(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env)


def fast_import_env(tmp) -> dict:
    "The environment for `ray start`: `import ray` there must not build the rfc3987 grammar that jsonschema pulls in."
    # Ray's raylet gives its agents a fixed 15 s to start; here `import ray` spends ~3 s of CPU building that grammar
    # (rfc3987_syntax comes with the Jupyter stack), which on two busy cores pushes the agents past the deadline.
    (tmp / 'rfc3987_syntax.py').write_text('raise ImportError("left out of Ray processes: slow to import")\n')
    return {
        **os.environ,
        'PYTHONPATH': os.pathsep.join([str(tmp), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
    }


SMALL = [
    '--node-ip-address',
    '127.0.0.1',
    '--num-cpus',
    '1',
    '--object-store-memory',
    str(100 * 2**20),
    '--disable-usage-stats',
    '--include-log-monitor',
    'False',
]


def proc_stat(pid: int) -> list[str]:
    "The fields of /proc/<pid>/stat after the command name: state, parent, ... (start time at index 19)."
    return (Path('/proc') / str(pid) / 'stat').read_text().rsplit(')', 1)[1].split()


def started_pids(marker: str) -> dict[int, str]:
    """{pid: start time} of the processes whose environment carries `marker` (what the fixture's `ray start` launched,
    the Ray workers) and of their descendants (a raylet's agents rename themselves, overwriting their environment)."""
    stat, ours = {}, set()
    for d in Path('/proc').iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat[int(d.name)] = proc_stat(int(d.name))
            if marker.encode() in (d / 'environ').read_bytes():
                ours.add(int(d.name))
        except (OSError, IndexError):
            pass
    while more := {p for p, st in stat.items() if int(st[1]) in ours and p not in ours}:
        ours |= more
    return {p: stat[p][19] for p in ours if stat[p][0] != 'Z'}


def running(pid: int, start: str) -> bool:
    "The same process (same start time) is alive and not a zombie."
    try:
        st = proc_stat(pid)
    except (OSError, IndexError):
        return False
    return st[19] == start and st[0] != 'Z'


def stop_started(marker: str, timeout: float = 5.0):
    "SIGTERM, then SIGKILL, the processes the cluster started, nothing else (`ray stop` would stop every Ray here)."
    pids = started_pids(
        marker
    )  # taken once: a killed raylet's agents lose their parent, not their place in this set
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in pids.items():
            try:
                if running(pid, start):
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        while (alive := [p for p, t in pids.items() if running(p, t)]) and time.monotonic() - t0 < timeout:
            time.sleep(0.2)
        if not alive:
            return


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    """A head and a worker node on 127.0.0.1 (or the cluster in MARIO_RAY_ADDRESS) with state of their own: a fresh
    home (no `~/.ray` token of an earlier local Ray), their own temporary folder, no token authentication on loopback.
    Afterwards exactly the processes they started are stopped, also on failure."""
    if os.environ.get('MARIO_RAY_ADDRESS'):
        yield os.environ['MARIO_RAY_ADDRESS']
        return
    tmp = tmp_path_factory.mktemp('ray')
    (tmp / 'home').mkdir()
    temp_dir = tempfile.mkdtemp(prefix='ray-')  # short: Ray's unix socket paths live under it
    marker = secrets.token_hex(8)
    port, env = free_port(), fast_import_env(tmp)
    env.update(HOME=str(tmp / 'home'), RAY_AUTH_MODE='disabled', MARIO_RAY_TEST=marker)
    mp = pytest.MonkeyPatch()
    mp.setenv(
        'RAY_AUTH_MODE', 'disabled'
    )  # this process joins as the driver: no token from this machine's ~/.ray
    try:
        node = [*SMALL, '--temp-dir', temp_dir]
        head = ray_cli(
            'start',
            '--head',
            '--port',
            str(port),
            '--include-dashboard=false',
            '--no-monitor',
            '--ray-client-server-port',
            str(free_port()),
            *node,
            env=env,
        )
        if head.returncode:
            pytest.fail(f"ray start --head failed: {(head.stderr or head.stdout).strip().splitlines()[-1]}")
        worker = ray_cli('start', '--address', f'127.0.0.1:{port}', *node, env=env)
        if worker.returncode:
            pytest.fail(
                f"ray start (worker) failed: {(worker.stderr or worker.stdout).strip().splitlines()[-1]}"
            )
        yield f'127.0.0.1:{port}'
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_started(marker)
        mp.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not started_pids(marker)


class Where(Callback):
    "Record the node and pid of every actor at the first update."

    def __init__(self):
        self.where = None

    def on_update(self, trainer, metrics):
        if self.where is None:
            self.where = trainer.actors.where()


def test_two_node_async_training(cluster, tmp_path):
    cfg = ray_config(cluster, tmp_path)
    w = Where()
    s = Trainer(cfg, [w], env_fn=CountingEnv).train()
    assert (s['stopped'], s['updates'], s['frames']) == ('done', 4, 4 * 5 * 4 * 4)
    assert s['episodes'] > 0 and os.path.exists(s['checkpoint'])
    nodes = {x['node'] for x in w.where}
    assert len(nodes) == 2, w.where  # one actor on each node (each has one CPU)
    assert not ray.is_initialized()  # the pool disconnected from the cluster when training ended


def ray_config(cluster, tmp_path, **kw) -> TrainingConfig:
    base = dict(mode='async', backend='ray', ray_address=cluster, actors=2, num_envs=4, queue_size=4, size=42,
                channels='4,8', blocks=1, hidden=16, core_size=16, rollout_steps=5, total_updates=4,
                **BEFORE_RECIPE, **QUICK, **outputs(tmp_path, 'ray'))
    return TrainingConfig(**{**base, **kw})


class KillActor(Callback):
    "SIGKILL actor 0's process (a real process of the cluster) at update 2; stop two updates after its restart."

    def __init__(self):
        self.pid, self.restarted_at = None, None

    def on_update(self, trainer, metrics):
        if metrics['update'] == 2:
            self.pid = trainer.actors.where()[0]['pid']
            os.kill(self.pid, signal.SIGKILL)
        if self.restarted_at is None and trainer.env_restarts:
            self.restarted_at = metrics['update']
        if self.restarted_at is not None and metrics['update'] >= self.restarted_at + 2:
            trainer.stop()


def test_killed_ray_actor_is_restarted(cluster, tmp_path):
    notes, k = [], KillActor()
    s = Trainer(
        ray_config(cluster, tmp_path, total_updates=60), [k], env_fn=CountingEnv, log=notes.append
    ).train()
    assert (s['stopped'], s['env_restarts']) == ('stop', 1), notes
    assert s['updates'] == k.restarted_at + 2  # training went on after the restart
    assert any(
        n.startswith('ray actor 0 failed (') and n.endswith('restarting it (restart 1/5)') for n in notes
    ), notes
    with pytest.raises(ProcessLookupError):
        os.kill(k.pid, 0)  # the killed process is gone for real


class Frames(Callback):
    "Ask for env 3's frame (actor 1's second env) after each update, as the panel's thread would, until one arrives."

    def __init__(self):
        self.frame = None

    def on_update(self, trainer, metrics):
        for _ in range(50):
            if self.frame is None:
                self.frame = trainer.preview_frame(3)
            if self.frame is not None:
                return
            time.sleep(0.1)


def test_preview_frame_comes_back_from_a_ray_actor(cluster, tmp_path):
    f = Frames()
    s = Trainer(ray_config(cluster, tmp_path, total_updates=2), [f]).train()  # real Mario envs on the actors
    assert s['stopped'] == 'done'
    assert f.frame is not None and f.frame.shape == (240, 256, 3) and f.frame.dtype == np.uint8
    assert f.frame.std() > 0  # a screen, not a blank buffer
