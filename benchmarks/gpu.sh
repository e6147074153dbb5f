#!/usr/bin/env bash
# The device check of the performance benchmarks, prepared runs on one GPU. On an H200, suites 1-3 take about 3
# minutes, step_compile about 4 (six compiles) and step_modes up to 7 (cold autotuning), so a 15-minute device lease
# (minutes of it go to starting the machine) holds 1-4 or 5 alone, with room to rerun a part:
#   1. step: ViT-L-14 at 448, global batch 32, bf16, S and I with none/CoOp/CoCoOp (images/s, MFU, peak memory,
#      and each row's 12 costliest kernels with how busy they kept the GPU);
#   2. cw_ssim: ours on the GPU (and on the CPU cores);
#   3. data: the training stream on the node's cores, 1/8/15 workers, and the workers it takes to feed step 1;
#   4. step_compile: step with model.compile=true on ViT-L-14-quickgelu (the tower of the default `pretrained:
#      openai`), S and I with none/CoOp/CoCoOp;
#   5. step_modes: S none on that tower eager (its QuickGELU as one SiLU kernel: 123.0 ms on an H200, 2026-11-27) and
#      under `default` and `max-autotune` (model.compile_mode), profiled. The other modes ran on 2026-11-26
#      (benchmarks/RESULTS.md); max-autotune autotuned for over 4 minutes on a cold cache, past this script's cap;
#   6. step_fp8: S with none/CoOp on that tower, compiled, with the bf16 tower and the fp8 one (model.tower_fp8),
#      profiled, and the fp8 tower's token error against the bf16 one (on an H200 with eager rows too: 3.5 minutes);
#   7. step_sdpa: S none on that tower, bf16 and fp8, compiled and profiled, with torch's attention kernel and with
#      cuDNN's forced (--sdpa: the H200's torch chose cuDNN's, 23.4 ms a bf16 step, but the first H100 lease's chose
#      FlashAttention-2, 32.3 ms; not yet run);
#   8. fp8_one_mk: S none on the fp8 tower with TORCHINDUCTOR_MULTI_KERNEL=1, compiled and profiled. Inductor loops a
#      reduction over more than 1024 elements, so it reads fc2's 4096-wide input twice to quantise it (17.1 ms of the
#      101.9 ms fp8 step, H200); multi-kernel also compiles such reductions persistent, one read, and keeps whichever
#      variant runs faster. Its baseline is step_sdpa's fp8 row with torch's kernel: run the two in one call.
# With no names it runs them all (more than one device call's 10 minutes); name suites to run only those, e.g.
# `bash benchmarks/gpu.sh step_modes`.
# Each suite's log lands in $OUT (the device tool's folder) or benchmarks/out. Random weights: throughput does not
# depend on them, and nothing is downloaded.
#
# The device machines lack a few of our packages (benchmarks/gpu-wheels.txt); fetch their wheels here once:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl -r benchmarks/gpu-wheels.txt
# and run, carrying .whl:  bash benchmarks/gpu.sh
set -uo pipefail
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
# One log per suite, holding each row's JSON line and the whole result at its end: the device tool brings back at most
# 8 files, and a suite its timeout stops still leaves the rows it finished.
# Line-buffered, so that a suite the device tool's limit stops leaves the rows it printed; the script exits 1 if any
# suite failed or ran past its cap.
only=" $* " failed=0
bench() { local name=$1 limit=$2; shift 2
    [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
    timeout "$limit" python3 -m temu_dist.bench "$@" 2>&1 | grep --line-buffered -v "^WARNING:root:No pretrained" \
        | tee "$out/$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu.sh: $name failed or ran past ${limit} s" >&2; failed=1; }; }
bench step 120 step --profile 12
bench cw_ssim 45 cw_ssim --pairs 64
bench data 100 data --workers 1 8 15 --epochs 1 --images 960
bench step_compile 270 step --backbone ViT-L-14-quickgelu --modes default
bench step_modes 420 step --backbone ViT-L-14-quickgelu --modes eager default max-autotune --variants S \
    --prompts none --profile 12
bench step_fp8 300 step --backbone ViT-L-14-quickgelu --modes default --towers plain fp8 --variants S \
    --prompts none coop --profile 12
bench step_sdpa 330 step --backbone ViT-L-14-quickgelu --modes default --towers plain fp8 --sdpa default cudnn \
    --variants S --prompts none --profile 12
TORCHINDUCTOR_MULTI_KERNEL=1 bench fp8_one_mk 200 step --backbone ViT-L-14-quickgelu --modes default --towers fp8 \
    --variants S --prompts none --profile 12
exit $failed
