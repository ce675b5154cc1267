#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU with torch, transformers and peft but no DeepSpeed,
# pydantic or zstandard: those travel as wheels in .whl/ (built here: `pip wheel --no-deps deepspeed==0.19.8`,
# the rest with `pip download --only-binary=:all: --python-version 3.12 ...`). Results go to $OUT; record them in
# bench/RESULTS.md with the card's name.
#
#   OUT=/tmp/gpu-out bash bench/gpu_checks.sh
set -u
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
t0=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, deepspeed, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__, '| pydantic', pydantic.__version__); from torch.nn.attention import varlen; print('varlen_attn:', hasattr(varlen, 'varlen_attn'))"
  python3 -c "import flash_attn" 2>/dev/null && echo "flash_attn: installed" || echo "flash_attn: not installed"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== pytest -m gpu ($(($(date +%s) - t0)) s)"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="" tests/test_attention.py tests/test_gpu_train.py \
    > "$OUT/pytest-gpu.log" 2>&1
  echo "pytest rc=$?"; tail -n 25 "$OUT/pytest-gpu.log"
fi

echo "== train bench, GPU mode ($(($(date +%s) - t0)) s)"
timeout 420 python3 bench/train_bench.py --gpu --out /tmp/bench-gpu --timeout 150 ${BENCH_ARGS:-} > "$OUT/bench-gpu.log" 2>&1
echo "bench rc=$?"
cp bench/results/train-gpu-*.json "$OUT/" 2>/dev/null
cp /tmp/bench-gpu/gpu-profile/profile.txt "$OUT/" 2>/dev/null
for f in /tmp/bench-gpu/*.log; do echo "---- $f"; tail -n 40 "$f"; done > "$OUT/bench-runs-tail.log" 2>&1
tail -n 40 "$OUT/bench-gpu.log"
echo "== done in $(($(date +%s) - t0)) s"
