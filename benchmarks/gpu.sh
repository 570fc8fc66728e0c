#!/usr/bin/env bash
# On a GPU machine, from the repo root: check correctness on the GPU, then time a LoRA step on
# Llama-2-7B-shaped random weights (seq 512, batch 1) with `jora bench` against Hugging Face PEFT
# (bf16, sdpa) on the same GPU, recording host peak RSS and device peak memory per configuration.
# Everything lands in $OUT if set (the device tool's output folder), else ./gpu-results/:
#   env.txt        python, package versions, jax devices, nvidia-smi
#   pytest.log     the correctness check
#   runs.jsonl     one JSON line per run: `jora bench`'s own line, or the PEFT child's, plus the harness's
#                  ru_maxrss / CPU / wall / load fields
#   summary.json   medians and ratios;  section.md: the table as benchmarks/RESULTS.md would show it
#   logs.tgz       every child's stdout/stderr;  gpu.log: this script's whole output
# (at most 8 files: the device tool brings back no more.)
#
# Python environment, chosen in this order:
#   1. $PYTHON if set;
#   2. the machine's python3 when it already has JAX with a GPU backend and CUDA torch. The lent
#      H100/H200 image has that (jax 0.11 + jax-cuda13 plugin, torch cu130, transformers, peft,
#      pytest) but no network, so the pure-Python packages it lacks (dm-haiku, jmp; optax pinned to
#      the version tested here) come as wheels: fetch them once on a machine with network with
#          bash benchmarks/gpu.sh --fetch-wheels        # -> build/gpu-wheels (ignored by git)
#      and carry that folder, e.g. device run: command "bash benchmarks/gpu.sh",
#      carry ["build/gpu-wheels"], timeout_s 600 (it ends itself
#      within about 10 minutes at worst; about 5-6 expected). They are installed with pip --no-index into
#      /tmp/jora-site, and the repo is used in place (PYTHONPATH), not pip-installed;
#   3. otherwise (a GPU machine with network): a venv in .venv-gpu with `pip install -e '.[test]'`
#      and `pip install -U "jax[cuda12]"`.
#
# Knobs (environment): PRESET (7B), ROUNDS (1), STEPS (10), WARMUP (3), PEFT_DTYPES ("bf16"),
# OURS ("bf16,bf16,matmuls bf16,bf16,layer"), TESTS (the two test files below),
# DRY_RUN=1 (CPU rehearsal: preset tiny, PEFT on cpu, no GPU checks; e.g.
# DRY_RUN=1 PYTHON=.venv/bin/python bash benchmarks/gpu.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WHEELS=build/gpu-wheels
WHEEL_PINS=(dm-haiku==0.0.17 jmp==0.0.4 optax==0.2.8)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${WHEEL_PINS[@]}"
fi

RES=${OUT:-$REPO/gpu-results}
mkdir -p "$RES"
WORK=$(mktemp -d /tmp/jora-gpu.XXXXXX)
START=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - START )) s] $*"; }

main() {
DRY_RUN=${DRY_RUN:-0}
if [[ "$DRY_RUN" == 1 ]]; then
    PRESET=${PRESET:-tiny}; DEVICE=cpu; STEPS=${STEPS:-2}; WARMUP=${WARMUP:-1}
    TESTS=${TESTS:-tests/test_lora.py}
else
    PRESET=${PRESET:-7B}; DEVICE=cuda; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-3}
    TESTS=${TESTS:-tests/test_lora.py tests/test_convert_parity.py}
fi
ROUNDS=${ROUNDS:-1}
PEFT_DTYPES=${PEFT_DTYPES:-bf16}
OURS=${OURS:-bf16,bf16,matmuls bf16,bf16,layer}

# --- environment -------------------------------------------------------------------------------
stamp "choosing the Python environment"
gpu_ready() {  # JAX sees a GPU and torch sees CUDA
    "$1" - <<'EOF' 2>/dev/null
import jax, torch
assert jax.default_backend() == "gpu", jax.default_backend()
assert torch.cuda.is_available()
EOF
}
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif command -v python3 >/dev/null && gpu_ready python3; then
    PY=python3
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        stamp "installing the carried wheels from $WHEELS into /tmp/jora-site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/jora-site "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
        export PYTHONPATH=/tmp/jora-site${PYTHONPATH:+:$PYTHONPATH}
    elif ! "$PY" -c "import haiku" 2>/dev/null; then
        stamp "no $WHEELS and no haiku: trying pip (needs network)"
        "$PY" -m pip install -q --target /tmp/jora-site "${WHEEL_PINS[@]}" || {
            echo "dm-haiku is missing and cannot be installed here: run 'bash benchmarks/gpu.sh --fetch-wheels'"
            echo "on a machine with network and carry $WHEELS"; exit 1; }
        export PYTHONPATH=/tmp/jora-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    stamp "creating .venv-gpu (network install)"
    python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e '.[test]' \
        && .venv-gpu/bin/pip install -q -U "jax[cuda12]" || { echo "install failed"; exit 1; }
    PY=.venv-gpu/bin/python
fi

{
    echo "python: $PY ($("$PY" --version 2>&1))"
    "$PY" - <<'EOF'
from importlib import metadata
import jax
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "dm-haiku", "optax", "torch",
          "transformers", "peft", "numpy"):
    try:
        print(f"{p} {metadata.version(p)}")
    except metadata.PackageNotFoundError:
        pass
print("jax backend:", jax.default_backend(), jax.devices())
import haiku, optax, pipeline.cli  # noqa: F401  (jora importable)
print("jora importable from", pipeline.cli.__file__)
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi
} 2>&1 | tee "$RES/env.txt"
if [[ "$DRY_RUN" != 1 ]] && ! gpu_ready "$PY"; then
    echo "JAX or torch does not see a GPU with $PY"; exit 1
fi

# --- correctness -------------------------------------------------------------------------------
# JAX runs the tests on the GPU (its default backend there). Full-precision fp32 matmuls: by default
# JAX on NVIDIA uses TF32 for fp32 dots, which the fp32 parity tolerances were not written for.
stamp "correctness: pytest $TESTS"
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout 180 "$PY" -m pytest $TESTS -q -x -p no:cacheprovider 2>&1 | tee "$RES/pytest.log"
TEST_RC=${PIPESTATUS[0]}
stamp "pytest exit status $TEST_RC"

# --- timing --------------------------------------------------------------------------------------
stamp "timing: $PRESET seq 512 batch 1, ours ($OURS) vs PEFT ($PEFT_DTYPES) on $DEVICE"
# shellcheck disable=SC2086
timeout 330 "$PY" benchmarks/peft_compare.py --device "$DEVICE" --presets "$PRESET" --seq 512 --batch 1 \
    --rounds "$ROUNDS" --steps "$STEPS" --warmup "$WARMUP" --peft $PEFT_DTYPES --ours $OURS \
    --threads "$(nproc)" --load-wait 0 --idle-wait 0 --child-timeout 200 --out "$WORK" > "$RES/section.md"
BENCH_RC=$?
cat "$RES/section.md"
for f in runs.jsonl summary.json; do [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$RES/"; done
tar -czf "$RES/logs.tgz" -C "$WORK" . 2>/dev/null
stamp "peft_compare exit status $BENCH_RC; results in $RES"
[[ $TEST_RC == 0 && $BENCH_RC == 0 ]]
}

main 2>&1 | tee "$RES/gpu.log"
exit "${PIPESTATUS[0]}"
