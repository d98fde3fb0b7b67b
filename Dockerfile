# syntax=docker/dockerfile:1
# mario-a3c training image: CUDA 12 runtime on Ubuntu 24.04, Python 3.13 managed by uv, PyTorch's CUDA 12.8 wheel.
#   docker build -t mario-a3c .
#   docker run --gpus all --shm-size=2g -v "$PWD/output:/app/output" mario-a3c          # train World 1-1 (the recipe)
#   docker run --gpus all --shm-size=2g -v "$PWD/output:/app/output" mario-a3c train --world 1 --stage 2 \
#       --checkpoint-dir output/trained_models --tensorboard-dir output/tensorboard        # any subcommand and flags
# Everything a run writes (run folders, checkpoints, TensorBoard events) goes under /app/output, a volume.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ghcr.io/astral-sh/uv:0.11.7 AS uv

FROM ${CUDA_IMAGE}
ARG PYTHON_VERSION=3.13
ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY --from=uv /uv /usr/local/bin/uv

# Python and the CUDA build of torch first: the largest layer, rebuilt only when these versions change.
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv \
 && uv pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /app
# The dependencies, pinned by constraints.txt (less its torch/CUDA pins, which are for PyPI's default CUDA 13 wheel),
# installed from the packaging files alone so that editing the code does not reinstall them.
COPY setup.py settings.ini constraints.txt README.md ./
RUN grep -vE '^(torch|triton|nvidia-|cuda-)' constraints.txt > /opt/constraints-image.txt \
 && mkdir mario_a3c && touch mario_a3c/__init__.py \
 && uv pip install -c /opt/constraints-image.txt . \
 && uv pip uninstall mario-a3c \
 && rm -rf mario_a3c build mario_a3c.egg-info

# The code (the package, and the notebooks for papermill runs), installed without touching the dependencies.
COPY mario_a3c ./mario_a3c
COPY nbs ./nbs
RUN uv pip install --no-deps . \
 && rm -rf build mario_a3c.egg-info \
 && useradd --create-home --uid 1001 --shell /bin/bash mario \
 && mkdir -p /app/output \
 && chown mario:mario /app/output

USER 1001
VOLUME ["/app/output"]
ENTRYPOINT ["mario-a3c"]
# the World 1-1 recipe, as `make train` runs it
CMD ["train", "--config", "mario_a3c/configs/world1_stage1.json", "--checkpoint-dir", "output/trained_models", "--tensorboard-dir", "output/tensorboard"]
