#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU with torch, transformers and peft but no DeepSpeed,
# pydantic or zstandard: those travel as wheels in .whl/ (built here: `pip wheel --no-deps deepspeed==0.19.8`,
# the rest with `pip download --only-binary=:all: --python-version 3.12 ...`). Results go to $OUT; record them in
# bench/RESULTS.md with the card's name.
#
#   OUT=/tmp/gpu-out bash bench/gpu_checks.sh        (about 4 minutes on one H200, timed before the eval bench
#                                                    was added; it may take up to 5 more)
#   SKIP_TESTS=1 / SKIP_TRAIN_BENCH=1 leave out a part; EVAL_ARGS="--hidden 1024 --layers 8" sizes the eval bench
set -u
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
# the image's TORCH_CUDA_ARCH_LIST ("9.0a") makes DeepSpeed's op builder fail to parse it; name the card's own
export TORCH_CUDA_ARCH_LIST=${CBT_CUDA_ARCH:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
t0=$(date +%s)
# DeepSpeed's fused Adam is JIT-built with nvcc; build it in the background while the tests run, so the
# optimizer comparison in the bench finds it ready (its build time is reported, not counted in any run)
( s=$(date +%s); python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
    > "$OUT/fusedadam-build.log" 2>&1; echo "fused adam build rc=$? in $(($(date +%s) - s)) s" >> "$OUT/fusedadam-build.log" ) &
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, deepspeed, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__, '| pydantic', pydantic.__version__)"
  python3 -c "import flash_attn" 2>/dev/null && echo "flash_attn: installed" || echo "flash_attn: not installed"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== pytest: GPU tests + the trainer's CPU perf tests on this transformers ($(($(date +%s) - t0)) s)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/train/test_attention.py tests/integration/test_gpu_train.py \
    tests/integration/test_train_perf.py > "$OUT/pytest-gpu.log" 2>&1
  echo "pytest rc=$?"; tail -n 15 "$OUT/pytest-gpu.log"
fi

if [ -z "${SKIP_TRAIN_BENCH:-}" ]; then
echo "== GPU train bench ($(($(date +%s) - t0)) s)"
timeout 420 python3 bench/gpu_train_bench.py --out /tmp/bench-gpu --timeout 200 ${BENCH_ARGS:-} > "$OUT/bench-gpu.log" 2>&1
echo "bench rc=$?"
cp "$(ls -t bench/results/train-gpu-*.json | head -1)" "$OUT/" 2>/dev/null
cp /tmp/bench-gpu*/*-ours-profile/profile.txt "$OUT/" 2>/dev/null
for f in /tmp/bench-gpu*/*.log; do echo "---- $f"; grep -E "optimizer:|attention:|model:|Error|error" "$f" | head -8; tail -n 5 "$f"; done \
  > "$OUT/bench-runs-tail.log" 2>&1
tail -n 40 "$OUT/bench-gpu.log"
cat "$OUT/fusedadam-build.log" | tail -n 3
fi

echo "== eval generation bench ($(($(date +%s) - t0)) s)"
timeout 300 python3 bench/eval_bench.py --device cuda ${EVAL_ARGS:-} --out "$OUT/eval_bench-gpu.json" > "$OUT/eval-bench.log" 2>&1
echo "eval bench rc=$?"; tail -n 8 "$OUT/eval-bench.log"
echo "== done in $(($(date +%s) - t0)) s"
