#!/usr/bin/env bash
# Runs the GPU part of the test suite and the GPU benchmarks in one device call (10 minutes at most):
# every stage has its own time limit, and a stage is skipped when less than its limit is left of the
# 570-second budget, so the call always ends in time and prints its summary. A short table last.
#
# The device image has torch, transformers, safetensors, click, tqdm and huggingface_hub but not
# zstandard: carry it as a wheel. Once, on the development machine, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
# Then call the device tool with carry [".whl"], timeout_s 600 and command "bash tools/gpu_check.sh".
# "bash tools/gpu_check.sh tests", "... bench" or "... profile" runs one part ("... distributed": 2+ GPUs); DRY_RUN=1 prints the plan
# and exits (non-zero when the stage limits exceed the budget).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-570}
mkdir -p "$OUT"
STAGES=${1:-tests bench}
declare -a SUMMARY=()

# stage NAME LIMIT_S LOG COMMAND...: runs COMMAND under `timeout LIMIT_S`, output to $OUT/LOG.
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((BUDGET - SECONDS))
    if [[ -n "${DRY_RUN:-}" ]]; then
        printf 'stage %-16s limit %4ss  %s\n' "$name" "$limit" "$*"
        PLANNED=$((PLANNED + limit))
        return
    fi
    if ((left < limit)); then
        SUMMARY+=("$(printf '%-16s skipped: %ss left of the budget, the stage may take %ss' "$name" "$left" "$limit")")
        return
    fi
    echo "== $name (limit ${limit}s) =="
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    tail -n 12 "$OUT/$log"
    case $rc in
        0) SUMMARY+=("$(printf '%-16s ok' "$name")") ;;
        124 | 137) SUMMARY+=("$(printf '%-16s TIMEOUT after %ss' "$name" "$limit")") ;;
        *) SUMMARY+=("$(printf '%-16s FAILED (exit %s)' "$name" "$rc")") ;;
    esac
}

PLANNED=0
if [[ -z "${DRY_RUN:-}" ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
fi

# Stage limits add up to the budget. They run most important first (the correctness gate, then issue 11's
# training step, its profile and the replay/reconstruct targets), so that if the setup or a slow stage ever
# eats into the budget it is the older, secondary measurements at the end that are skipped.
if [[ " $STAGES " == *" tests "* ]]; then
    # Every test with a CUDA case (vectors, kernels compiled for this GPU, train/replay across devices, the
    # device-side gradient against the host's, every gradient encoding) and the oracle tests (MeZO's sign),
    # which run wherever the suite runs; the momentum and Adam kernels on the GPU against the reference (the
    # n-SPSA, Adam and layer-wise end-to-end vectors run in test_spec_vectors on every backend). The fused-step
    # kernel tests join when present.
    TESTS=(tests/test_spec_vectors.py tests/test_kernels.py tests/test_roundtrip.py tests/test_oracle.py
        tests/test_device_grad.py::test_cuda_gives_the_host_bits_without_synchronising
        tests/test_step_pipeline.py::test_queued_steps_never_wait_for_the_gpu tests/test_rebuild_pipeline.py
        tests/test_distributed_rebuild.py tests/test_shards.py
        tests/test_momentum.py::test_cuda_kernels_give_the_reference_bits
        tests/test_momentum.py::test_gpu_kernels_compile_and_the_buffer_kernel_fuses_nothing
        tests/test_adam.py::test_cuda_gives_the_reference_bits)
    [[ -f tests/test_fused_step.py ]] && TESTS+=(tests/test_fused_step.py)
    stage tests 165 gpu_tests.log python3 -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}"
fi
if [[ " $STAGES " == *" bench "* || " $STAGES " == *" profile "* ]]; then
    # Issue 11: the training step (settled three-pass, fused two-pass, queued two-pass without host waits,
    # two forwards, the reference; the fused and queued steps' bytes checked against the torch path's), then
    # where a queued step's time goes (torch.profiler: top kernels, host gaps, host syncs per step).
    [[ " $STAGES " == *" bench "* ]] && stage train-step 60 train_step.txt python3 tools/bench_train_step.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256 --repeats 5
    stage profile 45 profile.txt python3 tools/profile_train_step.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256 --steps 3 --warmup 2
fi
if [[ " $STAGES " == *" bench "* ]]; then
    # Issue 4: replay throughput against torch on the same GPU, the 1.3B x 20k-step reconstruct, the peak
    # memory of training against inference, the roofline from the kernel's SASS (derived, not measured).
    stage replay-bf16 30 replay_bf16.txt python3 tools/bench_replay.py --device cuda --dtype BF16 --elements $((1 << 26)) --steps 100 --repeats 3
    stage reconstruct 85 reconstruct.txt python3 tools/bench_reconstruct.py --device cuda --params 1.3e9 --steps 20000 --repeats 1 --warmup 1
    stage train-memory 45 train_memory.txt python3 tools/bench_train_memory.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256 --steps 3 --repeats 1
    stage roofline 30 roofline.txt python3 tools/roofline.py
    # Issue 10: the base-less rebuild of an OPT-1.3B-shaped LoRA (r=8, q_proj and v_proj, 1.57M parameters) over
    # 20,000 steps, 3.1e10 element-steps: per-tensor costs, not the kernel, should dominate on a GPU.
    stage lora-rebuild 35 lora_rebuild.txt python3 tools/bench_lora_rebuild.py --device cuda --steps 20000 --repeats 5 --check-elements 2048
    stage replay-f32 25 replay_f32.txt python3 tools/bench_replay.py --device cuda --dtype F32 --elements $((1 << 26)) --steps 100 --repeats 3
    stage replay-f16 25 replay_f16.txt python3 tools/bench_replay.py --device cuda --dtype F16 --elements $((1 << 26)) --steps 100 --repeats 3
    stage replay-bf16-rad 25 replay_bf16_rad.txt python3 tools/bench_replay.py --device cuda --dtype BF16 --noise rademacher16 --elements $((1 << 26)) --steps 100 --repeats 3
fi

# Issue 12 on a machine with two or more GPUs, as its own call ("bash tools/gpu_check.sh distributed"; not in
# the default parts, whose stages fill the budget): data-parallel and sharded (FSDP2) training over nccl, step
# time and memory per rank against the world size. One GPU cannot run it: nccl takes one GPU per process.
if [[ " $STAGES " == *" distributed "* ]]; then
    GPUS=$( [[ -n "${DRY_RUN:-}" ]] && echo 8 || python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    WORLDS=1; for w in 2 4 8; do ((w <= GPUS)) && WORLDS+=",$w"; done
    if ((GPUS >= 2)); then
        stage dp-nccl 240 distributed_dp.txt python3 tools/bench_distributed.py --device cuda --worlds "$WORLDS" --shape llama-70m --batch 32 --steps 12
        stage shard-nccl 240 distributed_shard.txt python3 tools/bench_distributed.py --device cuda --shard --worlds "$WORLDS" --shape llama-70m --batch 32 --steps 12
    else
        SUMMARY+=("$(printf '%-16s skipped: %s GPU (nccl takes one GPU per process)' distributed "$GPUS")")
    fi
fi

if [[ -n "${DRY_RUN:-}" ]]; then
    echo "planned: ${PLANNED}s of stage limits within a ${BUDGET}s budget"
    ((PLANNED <= BUDGET)) || { echo "over budget"; exit 1; }
    exit 0
fi
echo
echo "== gpu_check summary (${SECONDS}s) =="
printf '%s\n' "${SUMMARY[@]}"
tail -n 1 "$OUT/gpu_tests.log" 2>/dev/null | sed 's/^/tests            /'
cat "$OUT"/replay_*.txt 2>/dev/null | grep -E "^(roofline|torch cuda|triton|FAIL)" | sed 's/^/replay           /'
grep -hE "^ +1,3|FAIL" "$OUT/reconstruct.txt" 2>/dev/null | sed 's/^/reconstruct      /'
grep -hE "^(rebuild:|baseline:|target|FAIL)" "$OUT/lora_rebuild.txt" 2>/dev/null | sed 's/^/lora rebuild     /'
grep -hE "^(two|mezo-replay|reference|FAIL)" "$OUT/train_step.txt" 2>/dev/null | sed 's/^/train step       /'
grep -hE "^(profile of|host time|  [a-z_]+ +[0-9.]+ ms|device per step|host gaps|host synchronisations|value reads|Error)" \
    "$OUT/profile.txt" 2>/dev/null | cut -c1-160 | sed 's/^/profile          /'
grep -hE "^(inference|MeZO)" "$OUT/train_memory.txt" 2>/dev/null | sed 's/^/memory           /'
for f in "$OUT"/distributed_dp.txt "$OUT"/distributed_shard.txt; do
    if [[ -f $f ]]; then tail -n 8 "$f" | sed "s/^/$(basename "$f" .txt | cut -c1-16)  /"; fi
done
