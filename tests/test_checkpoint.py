"""Checkpoints: atomic saves survive crashes, full trainer-state round trip, one-line errors, metadata, resume rules."""

import io
import json
import os
import random
import stat
import warnings
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch

from mario_a3c.checkpoint import (
    FORMAT_VERSION,
    REQUIRED_META,
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    load_meta,
    load_model_state,
    make_meta,
    meta_path,
    resolve_resume_config,
    restore_rng_state,
    save_checkpoint,
)
from mario_a3c.config import TrainingConfig
from mario_a3c.models import ImpalaActorCritic
from mario_a3c.schedules import warmup_cosine

# gray frames without held-button planes: 4 input channels, as `update` feeds
TINY = TrainingConfig(
    channels="4,4",
    hidden=16,
    core_size=16,
    size=42,
    recurrent_type="gru",
    num_envs=2,
    gray=True,
    held_buttons=False,
    total_updates=20,
    warmup_updates=2,
)


def trainer_state(cfg=TINY, seed=0):
    "Model, AdamW, schedule and scaler as the trainer builds them."
    torch.manual_seed(seed)
    model = ImpalaActorCritic(**cfg.model_kwargs())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    return (
        model,
        opt,
        warmup_cosine(opt, cfg.warmup_updates, cfg.total_updates, cfg.lr_floor),
        torch.amp.GradScaler("cpu"),
    )


def update(model, opt, sched, scaler, rng):
    "One update on random frames from both numpy and torch RNGs; returns the loss."
    T, B = 3, 2
    obs = torch.as_tensor(rng.integers(0, 255, size=(T, B, 4, 42, 42)), dtype=torch.uint8)
    starts = torch.rand(T, B) < 0.3
    logits, value, _ = model(obs, model.initial_state(B), starts)
    loss = value.pow(2).mean() - logits.log_softmax(-1).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    sched.step()
    return loss.item()


def bundle(model, opt, sched, scaler, rng, updates):
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng_state(rng),
        "updates": updates,
    }


def message(excinfo):
    s = str(excinfo.value)
    assert "\n" not in s, s
    return s


def test_round_trip_continues_exactly(tmp_path):
    m, o, s, sc = trainer_state()
    rng = np.random.default_rng(0)
    for _ in range(2):
        update(m, o, s, sc, rng)
    p = save_checkpoint(
        tmp_path, 1, 1, "latest", bundle(m, o, s, sc, rng, 2), make_meta(TINY, 2, 2 * TINY.frames_per_update)
    )
    ref = [update(m, o, s, sc, rng) for _ in range(3)]
    m2, o2, s2, sc2 = trainer_state(seed=7)
    rng2 = np.random.default_rng(7)
    state, meta = load_checkpoint(p)
    load_model_state(m2, state["model"], p)
    o2.load_state_dict(state["optimizer"])
    s2.load_state_dict(state["scheduler"])
    sc2.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"], rng2)
    assert [update(m2, o2, s2, sc2, rng2) for _ in range(3)] == ref
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert s2.get_last_lr() == s.get_last_lr() and state["updates"] == meta["updates"] == 2


def test_metadata_keys(tmp_path):
    p = save_checkpoint(
        tmp_path, 2, 3, "best", {"x": torch.ones(1)}, make_meta(TINY, 5, 640, 12.5, episodes=9)
    )
    assert p.name == "a3c_world2_stage3_best.pt"
    meta = json.loads(meta_path(p).read_text())
    assert set(REQUIRED_META) <= set(meta) and meta["format_version"] == FORMAT_VERSION
    assert meta["config"] == TINY.to_dict() and meta["immutable"] == TINY.immutable()
    assert {"mario_a3c", "stack", "torch", "gymnasium"} <= set(meta["versions"])
    assert (meta["updates"], meta["frames"], meta["best_avg_return"], meta["episodes"]) == (5, 640, 12.5, 9)
    assert load_meta(p)["updates"] == 5


def test_crash_mid_save_keeps_previous(tmp_path):
    p = save_checkpoint(tmp_path, 1, 1, "latest", {"v": torch.tensor([1.0])}, make_meta(TINY, 1, 1))
    real = torch.save

    def partial(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[:64])
        raise OSError("killed")

    with mock.patch("torch.save", partial), pytest.raises(OSError):
        save_checkpoint(tmp_path, 1, 1, "latest", {"v": torch.tensor([2.0])}, make_meta(TINY, 2, 2))
    with mock.patch("os.replace", side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, 1, "latest", {"v": torch.tensor([3.0])}, make_meta(TINY, 3, 3))
    state, meta = load_checkpoint(p)
    assert state["v"].item() == 1.0 and meta["updates"] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == [
        "a3c_world1_stage1_latest.json",
        "a3c_world1_stage1_latest.pt",
    ]


def test_crash_between_pt_and_json_uses_pt_metadata(tmp_path):
    p = save_checkpoint(tmp_path, 1, 1, "latest", {"v": torch.tensor([1.0])}, make_meta(TINY, 1, 1))
    real = os.replace

    def no_json(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        real(src, dst)

    with mock.patch("os.replace", no_json), pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, 1, "latest", {"v": torch.tensor([2.0])}, make_meta(TINY, 2, 2))
    assert not meta_path(
        p
    ).exists()  # the old .json went first: no stale metadata for tools that read only it
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        state, meta = load_checkpoint(p)
    assert state["v"].item() == 2.0 and meta["updates"] == 2
    assert (
        any("rewritten from the .pt" in str(x.message) for x in w)
        and json.loads(meta_path(p).read_text())["updates"] == 2
    )


@pytest.mark.parametrize(
    "damage,msg",
    [
        ("truncate", "is corrupt or not a mario_a3c checkpoint"),
        ("zero", "is corrupt or not a mario_a3c checkpoint"),
        ("foreign", "is not a mario_a3c checkpoint (no format_version/meta/state)"),
        ("numpy", "is corrupt or not a mario_a3c checkpoint (UnpicklingError"),
        (
            "nometa",
            "has no metadata file a3c_world1_stage1_latest.json",
        ),  # a foreign .pt: nothing to rebuild it from
        ("badjson", "a3c_world1_stage1_latest.json is not valid JSON"),
        ("version", "has format_version=2: this mario_a3c"),
    ],
)
def test_damaged_files_one_line(tmp_path, damage, msg):
    p = save_checkpoint(tmp_path, 1, 1, "latest", {"v": torch.arange(1000.0)}, make_meta(TINY, 1, 1))
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[:-200])
    if damage == "zero":
        p.write_bytes(b"")
    if damage == "foreign":
        torch.save({"state_dict": {}}, p)
    if damage == "numpy":
        torch.save({"format_version": 1, "meta": {}, "state": np.ones(2)}, p)
    if damage == "nometa":
        meta_path(p).unlink()
        torch.save({"state_dict": {}}, p)
    if damage == "badjson":
        meta_path(p).write_text("{")
    if damage == "version":
        meta_path(p).write_text(json.dumps({**json.loads(meta_path(p).read_text()), "format_version": 2}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert msg in message(e) and p.stem in message(e)


def test_missing_and_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(checkpoint_path(tmp_path, 1, 1, "latest"))
    p = save_checkpoint(tmp_path, 1, 1, "latest", {}, make_meta(TINY, 1, 1))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, expect={"stage": 2})
    assert "a3c_world1_stage1_latest.pt was trained with stage=1, expected stage=2" in message(e)
    other = ImpalaActorCritic(**replace(TINY, recurrent_type="lstm").model_kwargs())
    with pytest.raises(CheckpointError) as e:
        load_model_state(other, ImpalaActorCritic(**TINY.model_kwargs()).state_dict(), p)
    assert "does not fit this model" in message(e)


def test_state_must_be_plain(tmp_path):
    with pytest.raises(ValueError, match=r"state\['rng'\]\[0\] is a numpy.ndarray"):
        save_checkpoint(tmp_path, 1, 1, "latest", {"rng": [np.zeros(2)]}, make_meta(TINY, 0, 0))
    assert list(tmp_path.iterdir()) == []


def test_rng_round_trip_through_weights_only():
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    s = capture_rng_state(rng, gen)
    want = [
        (
            random.random(),
            np.random.rand(),
            rng.random(),
            torch.rand(1).item(),
            torch.rand(1, generator=gen).item(),
        )
        for _ in range(4)
    ]
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    rng2, gen2 = np.random.default_rng(2), torch.Generator().manual_seed(2)
    restore_rng_state(torch.load(buf, weights_only=True), rng2, gen2)
    got = [
        (
            random.random(),
            np.random.rand(),
            rng2.random(),
            torch.rand(1).item(),
            torch.rand(1, generator=gen2).item(),
        )
        for _ in range(4)
    ]
    assert got == want


def test_resume_rules(tmp_path):
    p = save_checkpoint(tmp_path, 1, 1, "latest", {}, make_meta(TrainingConfig(), 1, 1))
    meta = load_meta(p)
    with pytest.raises(ValueError) as e:
        resolve_resume_config(meta, {"recurrent_type": "gru", "lr": 1e-3})
    assert message(e) == (
        "cannot resume with recurrent_type='gru': checkpoint a3c_world1_stage1_latest.pt was trained "
        f"with recurrent_type={TrainingConfig().recurrent_type!r} (immutable)"
    )
    for k, v in dict(
        actions="complex",
        frame_skip=2,
        gray=not TrainingConfig().gray,
        size=84,
        stack=2,
        channels="16,32",
        blocks=2,
        hidden=128,
        core_size=128,
        window=8,
        heads=2,
        noisy=True,
    ).items():
        with pytest.raises(ValueError, match=f"cannot resume with {k}="):
            resolve_resume_config(meta, {k: v})
    c = resolve_resume_config(
        meta, {"hidden": 256, "channels": (8, 16, 16), "total_updates": 30000, "per": True}
    )
    assert c == replace(TrainingConfig(), total_updates=30000, per=True)


def test_each_file_is_fsynced_before_its_rename_and_the_folder_after(tmp_path):
    "Durable saves: a file's bytes are flushed to disk before the rename publishes them, and the rename itself after."
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)  # which file (inode), how many bytes it holds, file or folder
        events.append(("fsync", st.st_ino, st.st_size, stat.S_ISDIR(st.st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.stat(src).st_ino, os.path.basename(dst)))
        real_replace(src, dst)

    with mock.patch("os.fsync", fsync), mock.patch("os.replace", replace):
        p = save_checkpoint(tmp_path, 1, 1, "latest", {"v": torch.arange(5000.0)}, make_meta(TINY, 1, 1))
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert [events[i][2] for i in renames] == [p.name, meta_path(p).name]
    for i in renames:
        final = tmp_path / events[i][2]
        assert final.stat().st_ino == events[i][1]
        # the renamed inode was synced earlier, holding every byte of the final file, and the folder after the rename
        assert ("fsync", events[i][1], final.stat().st_size, False) in events[:i], events
        nxt = renames[renames.index(i) + 1] if i != renames[-1] else len(events)
        assert any(e[:2] == ("fsync", tmp_path.stat().st_ino) and e[3] for e in events[i + 1 : nxt]), events
    state, meta = load_checkpoint(p)
    assert torch.equal(state["v"], torch.arange(5000.0)) and meta["updates"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_with_fp16_scaler_and_device_rng(tmp_path):
    "On CUDA: fp16 autocast + GradScaler, inputs from the CUDA RNG; a resumed run repeats the reference exactly."
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def build(seed):
        torch.manual_seed(seed)
        m = ImpalaActorCritic(**TINY.model_kwargs()).cuda()
        o = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return m, o, warmup_cosine(o, 2, 20, 0.1), torch.amp.GradScaler("cuda", init_scale=1024.0)

    def step(m, o, s, sc):
        obs = torch.randint(0, 255, (3, 2, 4, 42, 42), dtype=torch.uint8, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            logits, value, _ = m(obs, m.initial_state(2, "cuda"), torch.rand(3, 2, device="cuda") < 0.3)
            loss = value.float().pow(2).mean() - logits.float().log_softmax(-1).mean()
        sc.scale(loss).backward()
        sc.step(o)
        sc.update()
        o.zero_grad()
        s.step()
        return loss.item()

    m, o, s, sc = build(0)
    for _ in range(2):
        step(m, o, s, sc)
    st = {
        "model": m.state_dict(),
        "optimizer": o.state_dict(),
        "scheduler": s.state_dict(),
        "scaler": sc.state_dict(),
        "rng": capture_rng_state(),
    }
    assert "cuda" in st["rng"]
    p = save_checkpoint(tmp_path, 1, 1, "latest", st, make_meta(TINY, 2, 2))
    ref = [step(m, o, s, sc) for _ in range(3)]
    m2, o2, s2, sc2 = build(5)
    step(m2, o2, s2, sc2)
    state, _ = load_checkpoint(p, map_location="cuda")
    m2.load_state_dict(state["model"])
    o2.load_state_dict(state["optimizer"])
    s2.load_state_dict(state["scheduler"])
    sc2.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    assert [step(m2, o2, s2, sc2) for _ in range(3)] == ref
    assert {str(v.device) for v in load_checkpoint(p, map_location="cpu")[0]["model"].values()} == {"cpu"}
