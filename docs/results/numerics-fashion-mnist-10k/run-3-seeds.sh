#!/bin/bash
# #24 paired numerics: bfloat16 (the default here) vs float32 features, mist_pool on the chosen wire
cd /work/main
export MIST_FED_CACHE=/work/cache-num FLWR_TELEMETRY_ENABLED=0
OUT=docs/results/numerics-fashion-mnist-10k
for n in bfloat16 float32; do
  date; echo start $n
  .venv/bin/python simulations/compare.py --tasks fashion-mnist --methods mist_pool --mist-k 12 \
    --wire pca192task-int4ch --epochs 15 --seeds 3 --test-limit 10000 --numerics $n \
    --cache-dir $([ $n = bfloat16 ] && echo /work/cloud-store || echo /work/num-store) --run-id $n --out $OUT > /work/num2-$n.log 2>&1
  echo rc=$?
done
.venv/bin/python simulations/pair_runs.py $OUT/float32 $OUT/bfloat16 > $OUT/paired.md 2>&1
date; echo done
