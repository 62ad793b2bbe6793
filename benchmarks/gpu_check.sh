#!/usr/bin/env bash
# Every GPU check in one command: the GPU-only tests (CUDA graph == eager first, then the fused kernels and the
# fast text path on CUDA), then the benchmark subset `--plan headline` (the README's headline numbers), each
# part under a time limit. Results land under $OUT: copy $OUT/results/*.json into benchmarks/results/ and run
# `python -m benchmarks --report-only` to make the tables and plots here.
#
# On a GPU machine without network access that lacks open_clip, bring its pure-Python wheels along in .whl/
# (`python3 -m pip download --no-deps -d .whl open_clip_torch ftfy wcwidth`); they are installed from there.
# FASTCOOP_COMMIT=<commit> names the commit measured when the tree's .git is not the one measured.
set -uo pipefail
OUT=${OUT:-/tmp/fastcoop-gpu}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # what start-up time depends on: the host's CPU, and whether imports find their bytecode cached
  echo "cpu: $(nproc) × $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  python3 benchmarks/bytecode.py torch torchvision open_clip timm triton
} | tee "$OUT/gpu.txt"
# An install without cached bytecode (e.g. uv's default, or a read-only one) compiles every module it imports, in
# every process: not what an install with bytecode, as pip's, pays. Then the first imports (the tests') write
# bytecode to a folder of their own, and the whole runs timed later read it; gpu.txt keeps the host's own state.
if ! python3 benchmarks/bytecode.py torch open_clip >/dev/null; then
  export PYTHONPYCACHEPREFIX=/tmp/fastcoop-pycache
  unset PYTHONDONTWRITEBYTECODE
  echo "bytecode: not cached here; written to $PYTHONPYCACHEPREFIX by the first imports" | tee -a "$OUT/gpu.txt"
fi
# most telling first: graph == eager (CoOp and CoCoOp, stacked), the device crops against PIL's on the GPU, the
# fused norm, the whole fast path on CUDA
# (without its FlexAttention cases, which compile for tens of seconds each), then the kernels' own matrices; one
# line per test, so a part cut short by its limit still says what passed. A shorter recheck names its own:
# FASTCOOP_TESTS (test files, space-separated) with FASTCOOP_TEST_K (a pytest -k expression), FASTCOOP_SECTIONS
# (benchmark sections), and the seconds each part may take, FASTCOOP_TEST_SECONDS and FASTCOOP_BENCH_SECONDS.
# The defaults fit one call of under 10 minutes: the step and whole runs first, the kernels' sections last.
if [ -n "${FASTCOOP_TESTS:-}" ]; then
  read -r -a tests <<< "$FASTCOOP_TESTS"
  tests+=(-k "${FASTCOOP_TEST_K:-not real_rn50 and not real_vit_b16}")
else
  tests=(tests/test_step.py tests/test_crops.py tests/test_encoder.py tests/test_add_layer_norm.py
         tests/test_text_encoder.py tests/test_cosine_ce.py tests/test_quick_gelu.py tests/test_mlp.py
         tests/test_prefix_attention.py
         -k "not real_rn50 and not real_vit_b16 and not flex")
fi
timeout "${FASTCOOP_TEST_SECONDS:-150}" python3 -m pytest -v --tb=short -p no:cacheprovider "${tests[@]}" 2>&1 \
  | tee "$OUT/tests.log"
timeout "${FASTCOOP_BENCH_SECONDS:-380}" python3 -m benchmarks --device cuda --plan headline --out "$OUT/results" \
  --sections "${FASTCOOP_SECTIONS:-step,protocol,full_run,cache,exactness,cocoop,attention,kernel}" 2>&1 \
  | tee "$OUT/bench.log"
# where a graphed step's time goes: a profiler trace of 20 steps of a Caltech101-shaped run (chrome://tracing)
python3 -c "import pathlib; from benchmarks.full_run import write_synthetic_cache as w
w(pathlib.Path('/tmp/fastcoop-profile.h5'), 'caltech101', shots=[16], seeds=[1])" && \
  timeout 120 python3 -m fastcoop train /tmp/fastcoop-profile.h5 --out /tmp/fastcoop-profile-run --epochs 2 \
  --overwrite --profile "$OUT/trace_caltech101.json" 2>&1 | tail -2
rm -f "$OUT"/results/*.png "$OUT/results/README.md"  # made again from the JSON
