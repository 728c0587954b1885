#!/usr/bin/env bash
# The GPU check of packed trials, prepared to run in one go on one GPU node (aimed at under 8 minutes on one GPU of
# the H100/H200 class; not yet run on one): the in-process tables (packed against unpacked training, AlexNet-224 by
# precision), then packed against unpacked sweeps of the quickstart MLP and the small CNN (lenet_cifar), with the
# GPU settings that exist without packing (fractional GPUs, AMP bf16/fp16, channels_last, compile), in one table.
#
#   benchmarks/gpu_check.sh            # from the repository root, in an environment where `pip install -e .` ran
#
# Every row of the sweep table is a real `sweep run` of 64 trials x 3 epochs (benchmarks/bench_pack.py). The first row of each model is
# today's sweep: one trial per GPU at a time. "gpu=0.125" shares the GPU between 8 trial processes; "pack=K" trains
# K trials as one model in one worker on the whole GPU, each trial asking for 1/K of it. Target: packed >= 10x the
# unpacked sweep's epochs/s for the MLP.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
# In one process, without Ray: member-epochs/s unpacked and packed (K = 8, 32), then seed 001's batch-4 AlexNet, then
# AlexNet at 224 px by precision (benchmarks/bench_inprocess.py). Targets: pack 32 of the MLP >= 300 member-epochs/s.
python benchmarks/bench_inprocess.py --models mlp,mlp_adam,mlp_big,lenet,lenet_bf16 --packs 8,32 --epochs 2
python benchmarks/bench_inprocess.py --models alexnet_b4 --packs 8 --epochs 1
python benchmarks/bench_inprocess.py --alexnet224
cpus=$(python -c "import os; print(max(1, os.cpu_count() // 2))")
python benchmarks/bench_pack.py --nets mlp,cnn --trials 64 --epochs 3 --variants \
"gpu=1;gpu=0.125;gpu=0.125,amp=bf16;gpu=0.125,amp=fp16;gpu=0.125,channels_last=true;gpu=1,compile=true;\
pack=8,gpu=1,cpu=${cpus};pack=64,gpu=1,cpu=${cpus};pack=64,gpu=1,cpu=${cpus},amp=bf16"
# Start-up: seconds from `sweep run` to Ray up and to the first reported epoch (the bundle has no dashboard).
python benchmarks/bench_startup.py --repeats 1 --no-dashboard
