# cbt-llm training image: CUDA 12.8 + the pinned Python stack (constraints.txt), flash-attn, DeepSpeed ops prebuilt.
#   docker build -t cbt-llm:latest --build-arg TORCH_CUDA_ARCH_LIST="8.0;9.0" .
#   docker run --gpus all --ipc=host --rm -v $PWD/runs:/app/runs cbt-llm:latest \
#       cbt-llm launch deepspeed --config configs/train/qwen2.5-7b-lora.yaml --gpus-per-node 8
# Slurm sites (Apptainer/Singularity): apptainer build cbt-llm.sif docker-daemon://cbt-llm:latest, then
#   cbt-llm launch slurm --config ... launch.slurm.container=cbt-llm.sif   (runs torchrun under `apptainer exec --nv`)
# Versions of torch, deepspeed, transformers, peft, ray... come from constraints.txt (a test checks the pins here).
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ARG PYTHON=python3.11
# A100 (8.0) and H100 (9.0); add 8.6/8.9 for consumer/L40 cards. Used by flash-attn and DeepSpeed op builds.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG FLASH_ATTN_VERSION=2.8.3
ARG LIGER_VERSION=0.8.5
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=8

RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common git ninja-build pdsh openssh-client libaio-dev && \
    add-apt-repository -y ppa:deadsnakes/ppa && apt-get update && \
    apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv ${PYTHON}-dev && \
    rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN ${PYTHON} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY constraints.txt pyproject.toml README.md ./
# torch first, the CUDA 12.8 build of the locked version
RUN pip install --upgrade pip && \
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY cbt_llm cbt_llm
COPY data_pipeline data_pipeline
COPY train train
COPY launch launch
COPY evaluation evaluation
COPY serve serve
COPY configs configs
RUN pip install -c constraints.txt . liger-kernel==${LIGER_VERSION} && \
    pip install --no-build-isolation flash-attn==${FLASH_ATTN_VERSION}
# DeepSpeed's fused Adam, CPU Adam (offload) and async I/O compiled now for TORCH_CUDA_ARCH_LIST, not at first use
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_AIO=1 DS_BUILD_UTILS=1 \
    pip install --no-build-isolation --force-reinstall --no-deps -c constraints.txt deepspeed && \
    ds_report

ENV WANDB_DIR=/app/runs
CMD ["cbt-llm", "--help"]
