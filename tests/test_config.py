"""TrainingConfig: field docs, validation messages, JSON round trip, argparse flags and overrides, parameters cell."""

import argparse
import ast
import contextlib
import io
import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from mario_a3c.config import (
    IMMUTABLE_FIELDS,
    TrainingConfig,
    add_config_args,
    config_from_args,
    describe_fields,
    explicit_overrides,
    parameters_cell_source,
    resolve_device,
)


ROOT = Path(__file__).resolve().parents[1]


def parser():
    return add_config_args(argparse.ArgumentParser(prog="train"))


def test_design_fields_and_defaults():
    "The field set and defaults: the World 1-1 recipe (a hand-written copy, not read from the class)."
    want = dict(
        world=1,
        stage=1,
        actions="simple",
        frame_skip=4,
        gray=False,
        size=64,
        stack=4,
        reward="shaped",
        flag_bonus=50.0,
        death_penalty=50.0,
        random_stage=False,
        stage_span=1,
        max_episode_steps=0,
        stall_steps=0,
        noop_max=0,
        held_buttons=True,
        sticky_actions=0.0,
        repress_jump=True,
        demo_starts=0.0,
        demo_focus="edge",
        retry_starts=0.0,
        retry_span=400,
        retry_every=4,
        demo_noops=False,
        demos="",
        num_envs=8,
        vectorization="threads",
        channels="8,16,16",
        blocks=1,
        hidden=256,
        recurrent_type="none",
        core_size=256,
        window=16,
        heads=4,
        noisy=False,
        layer_norm=True,
        init_from="",
        rollout_steps=32,
        total_updates=10000,
        max_minutes=0.0,
        lr=2.5e-4,
        weight_decay=0.0,
        warmup_updates=100,
        lr_floor=0.1,
        grad_accum=1,
        epochs=2,
        minibatches=2,
        clip_grad=40.0,
        adam_eps=1e-5,
        returns="vtrace",
        gamma=0.99,
        gae_lambda=0.95,
        rho_bar=1.0,
        c_bar=1.0,
        entropy_beta=0.01,
        uniform_kl_beta=0.0,
        value_coef=0.5,
        ppo_clip=0.2,
        adv_norm=True,
        per=False,
        per_capacity=2000,
        per_alpha=0.6,
        per_beta=0.4,
        per_batch=4,
        per_warmup=16,
        sil=False,
        sil_coef=1.0,
        sil_value_coef=0.01,
        sil_batch=32,
        sil_capacity=8192,
        sil_alpha=0.6,
        sil_beta=0.1,
        sil_init=True,
        amp=True,
        compile=True,
        device="auto",
        threads=1,
        seed=0,
        step_timeout=60.0,
        max_env_restarts=5,
        max_nan_steps=5,
        run_name="",
        runs_dir="output/runs",
        checkpoint_dir="trained_models",
        tensorboard_dir="tensorboard/a3c_super_mario_bros",
        checkpoint_every=200,
        keep_step_checkpoints=False,
        overwrite=False,
        log_every_s=10.0,
        avg_window=100,
        wandb_project="",
        wandb_mode="offline",
        mode="async",
        actors=2,
        queue_size=4,
        backend="mp",
        ray_address="",
        cold_envs=0.0,
        cold_temperature=0.5,
    )
    assert TrainingConfig().to_dict() == want
    assert set(IMMUTABLE_FIELDS) == {
        "actions",
        "frame_skip",
        "gray",
        "size",
        "stack",
        "held_buttons",
        "repress_jump",
        "channels",
        "blocks",
        "hidden",
        "recurrent_type",
        "core_size",
        "window",
        "heads",
        "noisy",
        "layer_norm",
    }


def class_body_fields():
    "(name, type, section, comment) of each field line of the config classes' source (EnvArgs first), as plain text."
    import inspect, re

    out, section = [], None
    for cls in reversed(TrainingConfig.__mro__):
        if "__dataclass_fields__" not in vars(cls):
            continue
        src = inspect.getsource(cls).split("\n    def ")[0].split("\n    @")[0]
        for line in src.splitlines():
            if m := re.fullmatch(r"    # (.+)", line):
                section = m[1]
            elif m := re.fullmatch(r"    (\w+): (\w+) = .+?  # (.+)", line):
                out.append((m[1], m[2], section, m[3]))
    return out


def test_every_field_is_documented_and_typed():
    info = describe_fields()
    assert [(i.name, i.type.__name__, i.section, i.doc) for i in info] == class_body_fields()
    assert len(info) == len(TrainingConfig().to_dict()) > 70  # every field has its line
    assert all(i.doc and i.section for i in info), [i.name for i in info if not (i.doc and i.section)]
    assert all(i.type in (int, float, str, bool) and isinstance(i.default, i.type) for i in info)


def test_derived_values():
    c = TrainingConfig(
        rollout_steps=16,
        num_envs=3,
        grad_accum=2,
        frame_skip=2,
        total_updates=50,
        warmup_updates=5,
        mode="sync",
        epochs=1,
        minibatches=1,
    )
    assert c.frames_per_update == 16 * 3 * 2 * 2 and c.total_frames == 50 * 16 * 3 * 2 * 2
    assert TrainingConfig(channels=(8, 16)).channels_tuple == (8, 16)
    kw = TrainingConfig(gray=False, held_buttons=False, stack=2, size=42, actions="complex").model_kwargs()
    assert (kw["in_channels"], kw["obs_size"], kw["core"], kw["n_actions"]) == (6, 42, "none", 12)
    assert TrainingConfig().model_kwargs(n_actions=3)["n_actions"] == 3
    assert TrainingConfig(max_episode_steps=500).env_kwargs()["max_episode_steps"] == 500
    assert resolve_device("cpu") == "cpu"


def test_model_and_env_kwargs_build_real_objects():
    from mario_a3c.envs import check_env_args
    from mario_a3c.models import ImpalaActorCritic

    c = TrainingConfig(
        channels="4,4",
        hidden=16,
        core_size=16,
        size=42,
        recurrent_type="transformer",
        heads=2,
        gray=True,
        held_buttons=False,
    )
    m = ImpalaActorCritic(**c.model_kwargs())
    assert (m.n_actions, m.in_channels, m.obs_size, m.core_kind) == (7, 4, 42, "transformer")
    assert check_env_args(**c.env_kwargs()).size == 42


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(world=0), "world=0 is not a Super Mario Bros world: allowed 1-8"),
        (dict(stage=5), "stage=5 is not a Super Mario Bros stage: allowed 1-4"),
        (dict(frame_skip=0), "frame_skip=0 is out of range: allowed 1-16"),
        (dict(size=8), "size=8 is out of range: allowed 16-512"),
        (dict(actions="all"), "actions='all' is not an action set"),
        (dict(reward="sparse"), "reward='sparse' is not a reward mode"),
        (dict(world=8, stage=3, stage_span=3), "stage_span=3 from 8-3: allowed 1-2"),
        (dict(max_episode_steps=-1), "max_episode_steps=-1 is out of range: allowed >= 0"),
        (dict(vectorization="procs"), "vectorization='procs': allowed threads, async, gym-async, sync"),
        (dict(recurrent_type="rnn"), "recurrent_type='rnn': allowed gru, lstm, transformer, none"),
        (dict(channels="a,b"), "channels='a,b' is not a comma list of positive ints"),
        (dict(heads=3, recurrent_type="transformer"), "heads=3 does not divide core_size=256"),
        (dict(lr_floor=2.0), "lr_floor=2.0 is out of range: allowed 0-1"),
        (dict(returns="td"), "returns='td': allowed vtrace, gae"),
        (dict(rho_bar=0.0), "rho_bar=0.0 is out of range: allowed > 0"),
        (dict(per_beta=-0.1), "per_beta=-0.1 is out of range: allowed 0-1"),
        (dict(per_capacity=10), "per_warmup=16 is out of range: allowed 1-10 (per_capacity)"),
        (dict(num_envs=2.5), "num_envs=2.5 is not an int"),
        (dict(amp=1), "amp=1 is not a bool"),
        (dict(lr=float("inf")), "lr=inf is not a finite float"),
        (dict(device="tpu"), "device='tpu': allowed auto, cpu, cuda or cuda:N"),
        (dict(run_name="../x"), "run_name='../x' must be a folder name"),
        (dict(wandb_mode="on"), "wandb_mode='on': allowed online, offline, disabled"),
    ],
)
def test_bad_values_one_line(kw, msg):
    with pytest.raises(ValueError) as e:
        TrainingConfig(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_json_round_trip_and_unknown_keys(tmp_path):
    c = TrainingConfig(
        world=5, stage=2, recurrent_type="none", channels="8", per=True, lr=3e-4, run_name="r1"
    )
    assert TrainingConfig.from_json(c.to_json(tmp_path / "a" / "c.json")) == c
    (tmp_path / "u.json").write_text(json.dumps({"world": 2, "lerning_rate": 1}))
    with pytest.raises(ValueError, match=r"u.json: unknown config key\(s\) lerning_rate"):
        TrainingConfig.from_json(tmp_path / "u.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        TrainingConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) bogus"):
        TrainingConfig.from_dict({"bogus": 1})


def test_every_field_has_a_flag_and_parses_back():
    p = parser()
    argv, want = [], {}
    for (
        i
    ) in describe_fields():  # every flag typed: bools flipped, the others at their default written as text
        flag = "--" + i.name.replace("_", "-")
        if i.type is bool:
            argv.append(flag if not i.default else "--no-" + i.name.replace("_", "-"))
            want[i.name] = not i.default
        else:
            argv += [flag, str(i.default)]
            want[i.name] = i.default
    assert explicit_overrides(p.parse_args(argv)) == want
    argv = [
        "--world",
        "7",
        "--lr",
        "0.001",
        "--channels",
        "4,4",
        "--recurrent-type",
        "gru",
        "--device",
        "cpu",
    ]
    c = config_from_args(p.parse_args(argv))
    assert c == replace(
        TrainingConfig(), world=7, lr=1e-3, channels="4,4", recurrent_type="gru", device="cpu"
    )
    for flag in (
        "--no-amp",
        "--no-compile",
        "--per",
        "--noisy",
        "--random-stage",
        "--config",
        "--config-out",
    ):
        assert flag in p._option_string_actions


def test_overrides_only_what_was_typed_and_precedence(tmp_path):
    p = parser()
    assert explicit_overrides(p.parse_args([])) == {}
    assert explicit_overrides(p.parse_args(["--seed", "0"])) == {"seed": 0}
    (tmp_path / "c.json").write_text(json.dumps({"num_envs": 2, "seed": 3}))
    args = p.parse_args(
        ["--config", str(tmp_path / "c.json"), "--seed", "4", "--config-out", str(tmp_path / "o.json")]
    )
    assert explicit_overrides(args) == {"num_envs": 2, "seed": 4}
    c = config_from_args(args, base=TrainingConfig(world=6, num_envs=6))
    assert (c.world, c.num_envs, c.seed) == (6, 2, 4)
    assert TrainingConfig.from_json(tmp_path / "o.json") == c
    args = p.parse_args(
        ["--config", str(tmp_path / "c.json"), "--preset", "gpu", "--seed", "4", "--actors", "2"]
    )
    c = config_from_args(args)  # defaults < --config < --preset < flags
    assert (c.num_envs, c.seed, c.channels, c.blocks, c.actors) == (32, 4, "16,32,32", 2, 2)


def test_bad_flags():
    p = parser()
    with pytest.raises(ValueError, match="total_updates=0 is out of range: allowed >= 1"):
        config_from_args(p.parse_args(["--total-updates", "0"]))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        p.parse_args(["--returns", "mc"])
    assert "invalid choice: 'mc'" in err.getvalue()


def test_parameters_cell_matches_fields():
    src = parameters_cell_source()
    tree = ast.parse(src)
    got = {n.target.id: (n.annotation.id, ast.literal_eval(n.value)) for n in tree.body}
    assert got == {f.name: (type(f.default).__name__, f.default) for f in fields(TrainingConfig)}
    lines = [l for l in src.splitlines() if l and not l.startswith("# ")]
    assert all("  # " in l for l in lines)
    ns = {}
    exec(src, {}, ns)
    assert TrainingConfig.from_namespace(ns) == TrainingConfig()


def test_choices_match_the_modules_that_use_them():
    from mario_a3c.config import CHOICES
    from mario_a3c.cores import CORES
    from mario_a3c.envs import REWARDS
    from mario_a3c.stacks import ACTION_SETS
    from mario_a3c.vector import VECTORIZATIONS

    assert CHOICES["recurrent_type"] == CORES and CHOICES["reward"] == REWARDS
    assert CHOICES["actions"] == ACTION_SETS and CHOICES["vectorization"] == VECTORIZATIONS


def test_papermill_reads_every_parameter():
    from papermill.translators import PythonTranslator

    params = PythonTranslator.inspect({"source": parameters_cell_source()})
    assert [(p.name, p.inferred_type_name, p.help) for p in params] == [
        (i.name, i.type.__name__, i.doc) for i in describe_fields()
    ]
    assert [eval(p.default) for p in params] == [i.default for i in describe_fields()]


def test_a_short_run_needs_no_warmup_flag():
    "The README's one-update export and two-update papermill runs: a warm-up longer than the run is not an error."
    assert TrainingConfig(total_updates=1).warmup_updates == 100
    assert TrainingConfig(total_updates=2, warmup_updates=0).total_updates == 2


def test_each_shipped_agent_was_trained_by_a_recipe_file():
    "Each shipped agent's config equals one recipe in mario_a3c/configs/ in every recipe field (stage/run/host aside)."
    from mario_a3c.checkpoint import load_meta
    from mario_a3c.config import recipe_diff
    from mario_a3c.evaluate import PRETRAINED_DIR

    metas = sorted(Path(PRETRAINED_DIR).glob("*.json"))
    recipes = {
        p.name: TrainingConfig.from_stored(json.loads(p.read_text()), p.name)
        for p in sorted((ROOT / "mario_a3c" / "configs").glob("*.json"))
    }
    assert metas and recipes
    for path in metas:
        stored = load_meta(path)["config"]
        diffs = {name: recipe_diff(stored, cfg) for name, cfg in recipes.items()}
        assert {} in diffs.values(), f"{path.name} was trained by no recipe in mario_a3c/configs/: {diffs}"


def test_recipe_file_is_the_defaults():
    from mario_a3c.config import recipe_diff

    recipe = json.loads((ROOT / "mario_a3c" / "configs" / "world1_stage1.json").read_text())
    assert recipe_diff(recipe) == {}
    assert recipe_diff({**recipe, "recurrent_type": "lstm"}) == {"recurrent_type": ("none", "lstm")}


def test_old_stored_configs_keep_their_meaning():
    "A stored config written before a field existed, or before the defaults became the recipe, keeps its values."
    old = TrainingConfig.from_stored({"world": 1})
    assert (old.gray, old.held_buttons, old.repress_jump, old.recurrent_type, old.mode) == (
        True,
        False,
        False,
        "lstm",
        "sync",
    )
    assert (old.epochs, old.minibatches, old.ppo_clip, old.adv_norm, old.layer_norm) == (
        1,
        1,
        0.0,
        False,
        False,
    )
    assert (old.retry_span, old.retry_every) == (200, 16)


def test_presets():
    from mario_a3c.config import PRESETS, preset_config

    g = preset_config("gpu")
    assert (g.channels_tuple, g.blocks, g.recurrent_type, g.core_size, g.hidden) == (
        (16, 32, 32),
        2,
        "lstm",
        256,
        256,
    )
    assert set(PRESETS) == {"gpu"} and preset_config("gpu", num_envs=16).num_envs == 16
    with pytest.raises(ValueError, match="preset='tpu' is not a preset: allowed gpu"):
        preset_config("tpu")
    with pytest.raises(ValueError, match="preset='big' is not a preset: allowed gpu"):
        config_from_args(parser().parse_args(["--preset", "big"]))


def test_train_notebook_parameters_are_the_defaults():
    "nbs/train.ipynb's parameters cell restates the fields: its values must be TrainingConfig()'s."
    nb = json.loads((ROOT / "nbs" / "train.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    ns = {}
    exec("".join(cell["source"]), {}, ns)
    assert TrainingConfig.from_namespace(ns) == TrainingConfig()
    assert {k for k in ns if k != "__annotations__"} == {f.name for f in fields(TrainingConfig)} | {
        "resume",
        "preset",
    }
    assert ns["preset"] == "" and ns["resume"] == ""
    assert parameters_cell_source().strip() in "".join(cell["source"])  # the same words as the field comments


def test_each_recipe_file_reads_the_same_as_a_recipe_and_as_stored():
    "A recipe file names every field whose meaning changed, so `--config` trains what the file trained when written."
    from mario_a3c.config import recipe_diff

    for p in sorted((ROOT / "mario_a3c" / "configs").glob("*.json")):
        stored = json.loads(p.read_text())
        assert recipe_diff(stored, TrainingConfig.from_json(p)) == {}, p.name
