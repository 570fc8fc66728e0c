#!/usr/bin/env bash
# On a GPU machine, from the repo root, in at most 10 minutes: a smoke test (at most 60 s), then one timed
# comparison at Llama-2-7B shape, seq 512 and 2048, batch 1, of jora's LoRA step (portable and cpu kernel
# sets) against Hugging Face PEFT (bf16, sdpa; eager, then torch.compile when the time allows), with
# step time, tokens/s, MFU against the device's datasheet bf16 peak, device memory after load and at
# peak, and a jax.profiler trace of the portable run. benchmarks/gpu_bench.py does the work and keeps to
# the deadline (what would not fit is skipped and said so). Results land in $OUT if set (the device
# tool's output folder), else ./gpu-results/: env.txt, runs.jsonl, summary.json, section.md (the table
# for benchmarks/RESULTS.md), trace.tgz, logs.tgz (every child's output), gpu.log (all of this output).
#
# Python environment, in this order:
#   1. $PYTHON (and $TORCH_PYTHON for the PEFT side, default $PYTHON) if set;
#   2. the machine's python3 when it already has JAX with a GPU backend and CUDA torch, as the lent
#      H100/H200 image has (jax 0.11 + jax-cuda13-plugin, torch cu130, transformers, peft). Its JAX is
#      not the one tested here (0.10.2), but jaxlib and the CUDA plugin (82 + 126 MiB of wheels) cannot
#      travel in the device tool's 64 MiB, so env.txt and section.md say which versions ran (DRY_RUN
#      passed with jax 0.11.2 on the CPU). It has no network: the pure-Python packages it lacks come as
#      wheels, fetched once on a machine with network by
#          bash benchmarks/gpu.sh --fetch-wheels        # -> build/gpu-wheels (ignored by git)
#      and carried: device run, command "bash benchmarks/gpu.sh", carry ["build/gpu-wheels"],
#      timeout_s 600. They go into /tmp/jora-site; the repo is used in place (PYTHONPATH);
#   3. otherwise (a fresh GPU machine with network): two venvs, so that torch's CUDA libraries never
#      shadow JAX's: .venv-gpu with JAX pinned to the version tested here and its CUDA plugin for the
#      driver (cuda13 from driver 580 on, else cuda12), and .venv-gpu-torch with CUDA torch,
#      transformers and peft. The install counts against the 10 minutes.
#
# Knobs (environment): PRESET (7B), SEQS ("512 2048"), STEPS (10), WARMUP (3), BUDGET (560 s from the
# start, installs included), EXTRA_PRESETS ("small128k": after the main preset's eager runs, jora portable
# and PEFT eager at each of these presets and the first seq; small128k = small with Llama 3's 128k
# vocabulary, the head-and-loss-bound step of issue 21; "" for none), DRY_RUN=1 (a CPU rehearsal of all of it: preset tiny, SEQS "128 512", 3
# steps, PEFT on the CPU, no nvidia-smi, BUDGET 240, the project's .venv).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
WHEELS=build/gpu-wheels
WHEEL_PINS=(dm-haiku==0.0.17 jmp==0.0.4 optax==0.2.8)
JAX_VERSION=0.10.2  # the versions tested here, for route 3
TORCH_PINS=(torch==2.13.0 transformers==5.25.0 peft==0.21.2)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${WHEEL_PINS[@]}"
fi

RES=${OUT:-$REPO/gpu-results}
mkdir -p "$RES"
stamp() { echo "== [$(( $(date +%s) - START )) s] $*"; }
gpu_ready() {  # JAX sees a GPU and torch sees CUDA
    "$1" -c 'import jax, torch; assert jax.default_backend() == "gpu" and torch.cuda.is_available()' 2>/dev/null
}

main() {
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    PRESET=${PRESET:-tiny}; SEQS=${SEQS:-128 512}; STEPS=${STEPS:-3}; WARMUP=${WARMUP:-1}; BUDGET=${BUDGET:-240}
    EXTRA_PRESETS=${EXTRA_PRESETS-small128k}
    DEVICE=cpu
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
else
    PRESET=${PRESET:-7B}; SEQS=${SEQS:-512 2048}; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-3}; BUDGET=${BUDGET:-560}
    EXTRA_PRESETS=${EXTRA_PRESETS-small128k}
    DEVICE=cuda
    if [[ -n "${PYTHON:-}" ]]; then
        PY=$PYTHON
    elif gpu_ready python3; then
        PY=python3
        stamp "using the machine's python3 ($(command -v python3)): it has JAX on the GPU and CUDA torch"
        if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
            pip_args=(--no-index "$WHEELS"/*.whl)
        elif ! python3 -c "import haiku, jmp" 2>/dev/null; then
            pip_args=("${WHEEL_PINS[@]}")  # needs network
        fi
        if [[ -n "${pip_args[*]:-}" ]]; then
            stamp "installing ${pip_args[*]} into /tmp/jora-site"
            python3 -m pip install -q --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/jora-site \
                "${pip_args[@]}" || { echo "cannot install dm-haiku, jmp, optax: run 'bash benchmarks/gpu.sh" \
                "--fetch-wheels' on a machine with network and carry $WHEELS"; exit 1; }
            export PYTHONPATH=/tmp/jora-site${PYTHONPATH:+:$PYTHONPATH}
        fi
    else
        command -v nvidia-smi >/dev/null || { echo "no nvidia-smi here (DRY_RUN=1 rehearses on the CPU)"; exit 1; }
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
        cuda=$([[ ${driver%%.*} -ge 580 ]] && echo 13 || echo 12)  # CUDA 13 needs driver 580 or later
        stamp "installing JAX $JAX_VERSION with the cuda$cuda plugin (driver $driver) and CUDA torch, in two venvs"
        # PyPI's torch is built for CUDA 13; for an older driver take a CUDA 12 build from PyTorch's index
        torch_index=$([[ $cuda == 12 ]] && echo --extra-index-url \
            "${TORCH_CUDA12_INDEX:-https://download.pytorch.org/whl/cu128}")
        { python3 -m venv .venv-gpu \
            && .venv-gpu/bin/pip install -q "jax[cuda$cuda]==$JAX_VERSION" "${WHEEL_PINS[@]}" pyarrow \
            && python3 -m venv .venv-gpu-torch \
            && .venv-gpu-torch/bin/pip install -q "${TORCH_PINS[@]}" $torch_index; } \
            || { echo "install failed"; exit 1; }
        PY=.venv-gpu/bin/python; TORCH_PYTHON=${TORCH_PYTHON:-.venv-gpu-torch/bin/python}
        "$PY" -c 'import jax; assert jax.default_backend() == "gpu"' && "$TORCH_PYTHON" -c \
            'import torch; assert torch.cuda.is_available()' || { echo "JAX or torch does not see the GPU"; exit 1; }
    fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stamp "benchmarking: $PRESET on $DEVICE, jax python $PY, torch python ${TORCH_PYTHON:-$PY}, budget $BUDGET s"
"$PY" benchmarks/gpu_bench.py --out "$RES" --deadline $((START + BUDGET)) --preset "$PRESET" --seqs $SEQS \
    --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" --torch-python "${TORCH_PYTHON:-$PY}" \
    --extra-presets $EXTRA_PRESETS \
    --command "$( [[ "${DRY_RUN:-0}" == 1 ]] && echo "DRY_RUN=1 ")bash benchmarks/gpu.sh"
rc=$?
stamp "gpu_bench exit status $rc; results in $RES"
left=$((START + BUDGET - $(date +%s)))
if (( left > 60 )); then  # the gate's evaluation: examples per second, batched against one at a time
    stamp "evaluate throughput (small preset), $left s left"
    timeout "$left" "$PY" benchmarks/evaluate_throughput.py --shapes small --kinds batched single --repeats 3 \
        > "$RES/evaluate_throughput.txt" 2>&1 || stamp "evaluate throughput did not finish (exit status $?)"
fi
return $rc
}

main 2>&1 | tee "$RES/gpu.log"
exit "${PIPESTATUS[0]}"
