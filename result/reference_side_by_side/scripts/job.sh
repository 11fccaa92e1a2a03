#!/bin/bash
# usage: job.sh ref|ours SEED
kind=$1; seed=$2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s)
if [ $kind = ref ]; then
  cd /tmp/ref && /work/main/.venv/bin/python run_ref.py $seed 1 > /tmp/sbs/ref-$seed.log 2>&1
else
  cd /tmp/sbs/code && /work/main/.venv/bin/python utils/main.py --model bmkp --dataset seq-cifar10 --compat official \
    --model_config best --n_epochs 1 --retrain_epochs 1 --seed $seed --num_threads 1 \
    --data_path /tmp/bmkpdata/cifar10-jpeg --results_dir /tmp/sbs/ours > /tmp/sbs/ours-$seed.log 2>&1
fi
echo "$kind $seed rc=$? wall=$(( $(date +%s) - start ))" >> /tmp/sbs/done.txt
