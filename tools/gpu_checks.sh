#!/usr/bin/env bash
# The checks only a CUDA machine can run, as one script (a lent GPU's minutes are few):
#
#   bash tools/gpu_checks.sh [LOG_DIR]        # default LOG_DIR: $OUT, else outputs/gpu_checks
#
# 1. the attention-JVP tests, with the fused Triton tangent kernel compiled for the GPU and every
#    fused (cuDNN / flash / efficient) kernel that returns the log-sum-exp; the forward-mode rules
#    with their tangents fused by torch.compile;
# 2. tools/bench_flux_meanflow on CUDA (bf16, FLUX width, 1024 px): the differential MeanFlow step against
#    the flow-matching step, with the tangent rules fused and eager, and a profile of each step
#    (bench_profile.txt: the kernels that took the time, what is live at the peak);
# 2b. mfu: tools/bench_flux_meanflow --mfu at FLUX.1 width (3072, 24 heads of 128; 2 double + 4
#    single blocks) in bf16 at 1024 px, batch 2: the flow-matching and differential steps' model
#    TFLOP/s, MFU against the bf16 matmul peak measured in the same run (8192^3, mean of 10), their
#    time ratio, and the planner's predicted time beside each (not yet run on a GPU; limit 480 s);
# 3. tools/bench_attention_jvp on CUDA: the attention JVP against the primal at 1k-4.6k tokens;
# 4. the trainer end to end on one GPU (NCCL, bf16): the tiny recipe for 24 steps with saves,
#    then resumed to step 30.
# te (last). Transformer Engine and FP8 (tools/te_checks.py): TE spec vs local spec in bf16, each
#    FP8 recipe vs bf16, FP8 recompute, bench_flux_meanflow at 1024 px micro-batch 1 and 2 (local
#    bf16 / TE bf16 / FP8), the tiny recipe in FP8 on the distributed optimizer (TE fused Adam) run,
#    saved, resumed and compared with an uninterrupted run. TE comes from the wheels in .whl/te/
#    (README "GPU checks": make_te_bundle.sh with EXTRA_WHEELS) when the machine lacks it; NVTE_CUDA_INCLUDE_DIR is
#    set to the machine's CUDA headers. Sized for about 6 minutes; not yet run on a GPU.
#
# Each stage has its own time limit and log file; a failing stage does not stop the next one. On an
# H200 the four took 84 s, 57 s, 10 s and 108 s (2026-11-28), plus the machine's start.
# GPU_CHECKS="bench_flux_meanflow trainer" runs only the stages named.
# Packages the machine lacks (megatron-core, webdataset) are installed from wheels in .whl/ when
# that folder exists (it is not part of the repository; see README "GPU checks").
set -u
log_dir=${1:-${OUT:-outputs/gpu_checks}}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mfmegatron_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/mfmegatron_site${PYTHONPATH:+:$PYTHONPATH}
fi

stage() {  # stage NAME SECONDS COMMAND...: run, keep the whole log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${GPU_CHECKS:-}" ] && [[ " $GPU_CHECKS " != *" $name "* ]]; then
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$log_dir/$name.log" 2>&1
    rc=$?
    echo "--- $name: exit $rc after $(($(date +%s) - start))s"
    grep -v -E "^\s*$|Warning|warn\(" "$log_dir/$name.log" | tail -n "${TAIL_LINES:-30}"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
} 2>&1 | tee "$log_dir/machine.log"

stage attention_tests 240 "$python" -m pytest -q -p no:cacheprovider \
    tests/test_attention_triton.py tests/test_attention_jvp.py tests/test_jvp_functional.py \
    -k "not interpreter"  # the interpreter tests are for CI (triton 3.6's interpreter fails them)
# 1024 px (4096 image + 512 text tokens), batch 2: the default GPU preset's 1.5k tokens at batch 1
# are bound by kernel launches, not by the GPU.
stage bench_flux_meanflow 240 bash -c "
    $python -m tools.bench_flux_meanflow --device cuda --image-tokens 4096 --batch 2 --tangent-passes triton \
        --tangent-fusion both --json $log_dir/bench_flux_meanflow.json --profile /tmp/gpu_checks/profile &&
    cat /tmp/gpu_checks/profile/* > $log_dir/bench_profile.txt"
stage mfu 480 "$python" -m tools.bench_flux_meanflow --device cuda --dtype bfloat16 --hidden 3072 --heads 24 \
    --double 2 --single 4 --image-tokens 4096 --text-tokens 512 --batch 2 --tangent-passes triton \
    --steps flow_matching meanflow_differential --warmup 3 --repeats 10 --mfu --matmul-size 8192 \
    --json "$log_dir/mfu.json"
stage bench_attention_jvp 120 "$python" -m tools.bench_attention_jvp --device cuda --dtype bfloat16 \
    --heads 24 --head-dim 128 --seq-lens 1024 2048 4096 4608 --tangent-pass logsumexp \
    --triton --triton-autotune --no-reference
trainer_run=(-m torch.distributed.run --nproc-per-node 1 -m mfmegatron.train recipes/flux_tiny_cpu.yaml
    parallel.tensor_parallel_size=1 model.dtype=bf16 data.shards=/tmp/gpu_checks/prompts
    train.save_interval=12 train.sample_interval=12 train.output_dir=/tmp/gpu_checks/run
    logging.progress_bar=false)
stage trainer 150 bash -c "
    $python -m tools.build_prompt_shards examples/prompts.txt --out /tmp/gpu_checks/prompts \
        --samples-per-shard 16 --overwrite &&
    $python ${trainer_run[*]} train.steps=24 &&
    echo '--- resume from step 24' && $python ${trainer_run[*]} train.steps=30 &&
    ls /tmp/gpu_checks/run /tmp/gpu_checks/run/checkpoints && tail -n 3 /tmp/gpu_checks/run/log.jsonl"
# te: Transformer Engine from .whl/te/ (kept apart from .whl/*.whl so that it is installed only
# when the machine lacks it, and the stages above run without it); torch is imported first.
if [ -z "${NVTE_CUDA_INCLUDE_DIR:-}" ]; then
    for dir in /usr/local/cuda/include /usr/local/cuda-*/include; do
        [ -f "$dir/cuda_runtime.h" ] && export NVTE_CUDA_INCLUDE_DIR=$dir && break
    done
fi
stage te 420 bash -c "
    if ! $python -c 'import torch, transformer_engine.pytorch' 2>/dev/null; then
        ls .whl/te/*.whl >/dev/null || { echo 'no Transformer Engine and no .whl/te/ (README: GPU checks)'; exit 1; }
        $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/mfmegatron_te .whl/te/*.whl || exit 1
        export PYTHONPATH=/tmp/mfmegatron_te\${PYTHONPATH:+:\$PYTHONPATH}
    fi
    $python -c 'import torch, transformer_engine, transformer_engine.pytorch; print(\"transformer_engine\", transformer_engine.__version__)' &&
    $python -m tools.te_checks --out $log_dir/te"
