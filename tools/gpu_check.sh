#!/usr/bin/env bash
# Runs the GPU part of the test suite and the GPU benchmarks in one device call; a short table last.
#
# The device image has torch, transformers, safetensors, click, tqdm and huggingface_hub but not
# zstandard: carry it as a wheel. Once, on the development machine, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
# Then call the device tool with carry [".whl"] and command "bash tools/gpu_check.sh".
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

# Every test that has a CUDA case (vectors, torch-vs-reference, train on GPU / replay on CPU and GPU).
python3 -m pytest -q -p no:cacheprovider tests/test_spec_vectors.py tests/test_roundtrip.py -rs \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -n 5
tests=$(tail -n 1 "$OUT/gpu_tests.log")

bench() { python3 tools/bench_replay.py "$@" 2>&1 | tee -a "$OUT/bench.txt" | tail -n 3; }
: > "$OUT/bench.txt"
for dtype in BF16 F32; do bench --device cuda --dtype "$dtype" --elements $((1 << 24)) --steps 50; done

# Issue 3: a 1B-class random-init model, MeZO steps against plain inference on the same batch.
python3 tools/bench_train_memory.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256 --steps 3 \
    2>&1 | tee "$OUT/train_memory.txt" | tail -n 6

echo
echo "== gpu_check summary =="
printf '%-12s %s\n' "tests" "$tests"
grep -E "^(torch cuda|numpy reference)|identical" "$OUT/bench.txt" | sed 's/^/bench        /'
grep -E "^(inference|MeZO)" "$OUT/train_memory.txt" | sed 's/^/memory       /'
