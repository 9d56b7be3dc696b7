#!/usr/bin/env bash
# Runs the GPU part of the test suite and the GPU benchmarks in one device call; a short table last.
#
# The device image has torch, transformers, safetensors, click, tqdm and huggingface_hub but not
# zstandard: carry it as a wheel. Once, on the development machine, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
# Then call the device tool with carry [".whl"] and command "bash tools/gpu_check.sh". Everything takes
# about 10 minutes, one call's limit: "bash tools/gpu_check.sh tests" and "... bench" split it in two.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

STAGES=${1:-tests bench}
tests="(not run)"
if [[ " $STAGES " == *" tests "* ]]; then
# Every test that has a CUDA case: vectors, kernels (Triton compiled for this GPU), train/replay across devices.
python3 -m pytest -q -p no:cacheprovider tests/test_spec_vectors.py tests/test_kernels.py tests/test_roundtrip.py -rs \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -n 5
tests=$(tail -n 1 "$OUT/gpu_tests.log")
fi
touch "$OUT/bench.txt" "$OUT/reconstruct.txt" "$OUT/train_step.txt" "$OUT/train_memory.txt"
if [[ " $STAGES " == *" bench "* ]]; then

# Issue 4: the roofline from the kernel's SASS, replay throughput against torch on the same GPU, the 1.3B x
# 20k-step reconstruct, the reconstruct-time plot, and the training step against the reference MeZO step.
python3 tools/roofline.py 2>&1 | tee "$OUT/roofline.txt"
bench() { python3 tools/bench_replay.py --device cuda "$@" 2>&1 | tee -a "$OUT/bench.txt" | tail -n 6; }
: > "$OUT/bench.txt"
bench --dtype BF16 --elements $((1 << 26)) --steps 200
bench --dtype BF16 --noise rademacher16 --elements $((1 << 26)) --steps 200
bench --dtype F32 --elements $((1 << 26)) --steps 200
bench --dtype F16 --elements $((1 << 26)) --steps 200
python3 tools/bench_reconstruct.py --device cuda --params 1.3e9 --steps 20000 2>&1 | tee "$OUT/reconstruct.txt"
python3 tools/bench_reconstruct.py --device cuda --sweep --csv "$OUT/reconstruct_cuda.csv" \
    --plot "$OUT/reconstruct_cuda.png" 2>&1 | tee -a "$OUT/reconstruct.txt"
python3 tools/bench_train_step.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256 --steps 5 \
    2>&1 | tee "$OUT/train_step.txt"
python3 tools/bench_train_memory.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256 --steps 3 \
    2>&1 | tee "$OUT/train_memory.txt" | tail -n 6
fi

echo
echo "== gpu_check summary =="
printf '%-12s %s\n' "tests" "$tests"
grep -E "^(device=|roofline|torch cuda|triton)" "$OUT/bench.txt" | sed 's/^/replay       /'
grep -E "^ +1,3" "$OUT/reconstruct.txt" | sed 's/^/reconstruct  /'
grep -E "^(two|mezo-replay|reference)" "$OUT/train_step.txt" | sed 's/^/train step   /'
grep -E "^(inference|MeZO)" "$OUT/train_memory.txt" | sed 's/^/memory       /'
