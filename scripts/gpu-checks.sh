#!/usr/bin/env bash
# Every GPU check in one run (issues: inference/device-agnostic, GPU): the cuda-marked tests, the
# tiny demo on the GPU with generation, the kernel and PKM-layer benchmarks, and 50 steps of
# configs/pkm-125m.yaml for tokens/s and MFU. Each step is time-boxed and failures are logged,
# not fatal, so one run gives every figure it can.
#   scripts/gpu-checks.sh [OUT_DIR]        (OUT_DIR default: $OUT, else runs/gpu-checks)
#   ONLY="tests-cuda demo" scripts/gpu-checks.sh    run only these steps
#   SCALE=2 scripts/gpu-checks.sh                   multiply every step's time limit
# Wheels in .whl/ (packages the GPU image lacks) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu-checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
memtron() { python3 -m memtron.cli "$@"; }

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$(( $2 * ${SCALE:-1} ))
    shift 2
    [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "[gpu-checks] $name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n "${TAIL:-6}" "$out/$name.log" | sed 's/^/    /' | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/summary.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/summary.txt"

step tests-cuda 130 python3 -m pytest -q -s -m cuda -p no:cacheprovider -rs tests/test_cuda.py \
    tests/test_kernels.py
data=runs/data/tiny
step demo 80 bash -c "set -e
    python3 -m memtron.cli data synth --out $data >/dev/null
    python3 -m memtron.cli data prepare $data/raw/train.jsonl --out $data/train --seq-len 128
    python3 -m memtron.cli data prepare $data/raw/valid.jsonl --out $data/valid --seq-len 128
    python3 -m memtron.cli train --config configs/tiny-cpu.yaml --resume none logging.progress=false
    python3 -m memtron.cli generate --ckpt runs/tiny-cpu --prompts $data/questions.jsonl \
        --limit 3 --greedy --max-new-tokens 12"
step pkm-125m 80 bash -c "set -e
    python3 -m memtron.cli data prepare $data/raw/train.jsonl --out $data/train-2k --seq-len 2048
    python3 -m memtron.cli train --config configs/pkm-125m.yaml --resume none \
        model.vocab_size=50304 data.tokenizer=byte data.train=$data/train-2k \
        data.valid=$data/train-2k train.steps=50 optim.warmup_steps=5 train.eval_every=0 \
        checkpoint.every=0 logging.progress=false train.log_every=10 train.run_dir=runs/pkm-125m
    python3 - <<'EOF'
import json
rows = [json.loads(l) for l in open('runs/pkm-125m/metrics.jsonl')]
train = [r for r in rows if r['kind'] == 'train']
late = train[10:]
tps = sorted(r['tokens_per_s'] for r in late)[len(late) // 2]
tf = sorted(r['tflops'] for r in late)[len(late) // 2]
print(f'pkm-125m steps 11-50: median {tps:,.0f} tokens/s, {tf:.1f} TFLOP/s')
EOF"
step bench-kernels 80 python3 bench/gpu_kernels.py --out "$out/gpu_kernels.json"
step bench-pkm-layer 60 python3 bench/pkm_layer.py --device cuda
cp runs/pkm-125m/metrics.jsonl "$out/pkm-125m-metrics.jsonl" 2>/dev/null || true
echo "[gpu-checks] done" | tee -a "$out/summary.txt"
