#!/bin/bash
# One device run: the quantized products of bench/gpu_check.py (section "products"),
# int4 at 256 rows in each form of pali_kit.quant.INT4_PRODUCT ("int4" = the default,
# "int4-s4", "int4-dequantize" = the former form, "int4-unscaled" = a diagnostic).
# JAX held to a T4's 15.6 GB. Leaves gpu_check.json, products.log and one HLO file
# per quantized format in $OUT (8 files).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.104 PYTHONPATH=$PWD TF_CPP_MIN_LOG_LEVEL=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
timeout 300 python bench/gpu_check.py --sections env,products --out $OUT 2>&1 \
    | grep -v "EXECUTION FAILED\|Delay kernel" > $OUT/products.log
echo "[products rc=${PIPESTATUS[0]} $(( $(date +%s) - t0 )) s]" | tee -a $OUT/products.log
python - "$OUT/gpu_check.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["products"]:
    if r["rows"] == 256:
        print(f'{r["matrix"]:28} {r["weights"]:16} temp/float {r["temp / float matrix"]:.3f} '
              f'{r["us"]:8.1f} us  gemm {r["custom_call_gemm"]} triton {r["triton_gemm_fusions"]} '
              f'err {r["max|y - y_dequantized| / max|y|"]}')
PY
