#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of a few minutes (CI has no GPU, so they run where one is lent):
#   scripts/gpu_check.sh            # every step; logs and records under $OUT (default: a fresh temp folder)
#   QLOAD_GPU_STEPS="tests loads" scripts/gpu_check.sh    # some of: info tests loads bench suite
# and, to fit a short lease: QLOAD_GPU_QUANTS (loads: a comma list), QLOAD_BENCH_QUANTS (bench: a space list),
# QLOAD_SUITE_ARGS (suite: test files or -k ...), QLOAD_SUITE_TIMEOUT (seconds, default 200)
# 1. tests: the requires_cuda tests (a bitsandbytes load onto cuda byte-identical to from_pretrained's; every
#    stage records its GPU peaks)
# 2. loads: `python -m pipeline` on tiny_llama onto the GPU, one job per backend scheme (a -m sweep), and the
#    sweep's report
# 3. bench: benchmarks/load.py --device cuda on the TinyLlama-1.1B shape: the whole command against a
#    from_pretrained script onto cuda, wall time and GPU peak
# 4. suite: the default test suite on the GPU machine (where device_map=auto puts models on the GPU), over
#    pytest-xdist when it is installed
# Packages the GPU machine lacks can come as wheels in .whl/ (installed into /tmp/site first, no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
STEPS=${QLOAD_GPU_STEPS:-info tests loads bench suite}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 QLOAD_CACHE=${QLOAD_CACHE:-/tmp/qload-cache}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
has() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo; echo "=== $1 ($(date +%T))"; }

if has info; then
  step info
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY - <<'EOF'
import torch, transformers, accelerate, bitsandbytes, safetensors
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.device_count(), "GPU(s)")
print("transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "bitsandbytes", bitsandbytes.__version__, "safetensors", safetensors.__version__)
EOF
fi

if has tests; then
  step "tests: requires_cuda"
  timeout 240 $PY -m pytest -q -rs -p no:cacheprovider -m requires_cuda tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"
fi

if has loads; then
  step "loads: tiny_llama onto the GPU, every backend"
  quants=bnb/nf4,bnb/nf4_double,bnb/fp4,bnb/int8,none,torchao/int4_weight_only,torchao/int8_weight_only
  quants+=,torchao/float8_weight_only,quanto/int8,quanto/int4,hqq/b4_g64
  quants=${QLOAD_GPU_QUANTS:-$quants}
  timeout 300 $PY -m pipeline -m "quant=$quants" device_map=auto hydra.sweep.dir="$OUT/loads" \
    hydra.sweep.subdir='${hydra.job.num}' 2>&1 | tee "$OUT/loads.log"
  $PY -m pipeline.report "$OUT/loads" 2>&1 | tee -a "$OUT/loads.log"
  tar czf "$OUT/loads.tar.gz" -C "$OUT" loads && rm -rf "$OUT/loads"
fi

if has bench; then
  step "bench: the 1.1B shape onto the GPU, ours against from_pretrained"
  timeout 300 $PY benchmarks/load.py --device cuda --model tinyllama_1_1b --quant ${QLOAD_BENCH_QUANTS:-nf4_double int8 none} \
    --mode warm --pairs 1 --cache "$QLOAD_CACHE" 2>&1 | tee "$OUT/bench.log"
fi

if has suite; then
  step "suite: the default tests on a GPU machine"
  xdist=()
  $PY -c "import xdist" 2>/dev/null && xdist=(-n "$(($(nproc) - 2))")
  missing=()  # test files whose packages this machine lacks (optuna, gguf, the submitit launcher)
  for mod in optuna gguf hydra_plugins.hydra_submitit_launcher; do
    $PY -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
  ignore=()
  ((${#missing[@]})) && echo "missing here: ${missing[*]}; their test files are left out" &&
    ignore=(--ignore=tests/test_search.py --ignore=tests/test_cluster.py --ignore=tests/test_packaging.py
      --ignore=tests/test_sweeps.py --ignore=tests/test_slurm.py)
  # -v: each test's outcome as it ends, so a run cut short by the timeout still says what passed and failed
  timeout "${QLOAD_SUITE_TIMEOUT:-200}" $PY -m pytest -v -p no:cacheprovider "${xdist[@]}" "${ignore[@]}" \
    ${QLOAD_SUITE_ARGS:-} >"$OUT/suite.log" 2>&1
  grep -E "FAILED|ERROR|passed|failed" "$OUT/suite.log" | tail -40
fi
echo; echo "=== done ($(date +%T)); logs in $OUT"
