#!/bin/bash
# One device run: the fine-tune memory plan checked for real (10B int4 + bf16 at batch 4;
# 3B float16 frozen at batch 8, the T4 recipe), then the float16 numerics policy's cost
# against compute_dtype="float16" in whole-model decode. JAX held to a T4's 15.6 GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.104 PYTHONPATH=$PWD TF_CPP_MIN_LOG_LEVEL=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/env.log
run() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout $limit "$@" > $OUT/$name.full 2>&1; local rc=$?
  grep -v "EXECUTION FAILED\|Delay kernel" $OUT/$name.full | tail -40 > $OUT/$name.log
  echo "[$name rc=$rc $(( $(date +%s) - t0 )) s]" | tee -a $OUT/$name.log
  tail -5 $OUT/$name.log | cut -c1-1500; rm -f $OUT/$name.full
}
run train10b 210 python scripts/plan_finetune.py --check-on-device --model paligemma2-10b-pt-224 \
    --frozen int4 --trainable-dtype bfloat16 --batch 4 --steps 2 --plan-on-cpu 14.34
run train3b 150 python scripts/plan_finetune.py --check-on-device --model paligemma2-3b-pt-224 \
    --frozen float16 --trainable-dtype float32 --batch 8 --steps 2 --plan-on-cpu 11.15
run decode 150 python bench/gpu_check.py --sections env,decode --formats float16,float16-fast \
    --new-tokens 24 --out $OUT
