#!/usr/bin/env bash
# Device calls of a real-EM round (issue 13) on one warm machine, one phase a call; run from the repository root.
# The wheels (.whl_gpu: `bash ../shared/gpu-wheels.sh`, less the two notebook-frontend wheels) and the data folders
# (`bash kernels/prep_real_em_data.sh`: data_em_a, data_em_s, data_em_d, data_em_e, what each holds in its header) are
# carried, each in a call before the one that needs it (with the working tree, 64 MiB a call: that script splits a
# folder that does not fit into parts, `split_carry.py`, a file too large into chunks, and prints what to carry; every
# phase first merges the parts carried so far back into their folder, a file's chunks once all have come); ignored
# folders stay on a warm machine, which is given back after 30 s idle: issue the next call at once. PRE_DATA overrides
# the pretraining roots.
#   bash kernels/session_real_em.sh install                 # install the wheels; name the GPU and the carried data
#   bash kernels/session_real_em.sh checks                  # fastai's loop with and without the lagged loss
#   bash kernels/session_real_em.sh pretrain 330 [--pre-steps 1200]   # both models on data_em_a, _s, _d, _e, kept
#   bash kernels/session_real_em.sh finetune 480 data_em_a drosophila-vnc [extra real_em.py arguments]
#   e.g. ... finetune 480 data_em_d,data_em_e sbem-mito,kidney-gbm --fracs 0.1 --ft-steps 700
#   several pretrainings, one fine-tuning call: ... pretrain 330 --pre-share 0.25 --save-pretrained runs/pre_q, then
#   ... finetune 480 data_em_a,data_em_d,data_em_e drosophila-vnc,sbem-mito,kidney-gbm --compare-pretrained runs/pre_q
set -uo pipefail
export PYTHONPATH=.:.site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
phase=$1; shift
mkdir -p "$OUT"                                         # a phase may log into a folder of its own: OUT=$OUT/pre
log=$OUT/session_$phase.log
step() { local t=$1; shift; echo "== $(date -u +%T) $* (limit ${t}s)" | tee -a "$log"; timeout "$t" "$@" 2>&1 |
  grep -v 'Epoch\|it/s' >> "$log"; }         # every line but progress bars: a dying worker's own message too
for part in data_em_*_p[0-9]*/; do                      # parts of a split folder (split_carry.py) into the folder
  [ -d "$part" ] && mkdir -p "${part%_p*}" && cp -r "$part". "${part%_p*}/"   # parts are disjoint
done
find data_em_* -path 'data_em_*_p[0-9]*' -prune -o -name '*.part1of*' -print 2>/dev/null | while read -r c; do
  f=${c%.part1of*} k=${c##*of}                          # a file cut in k chunks: whole again once all k have come
  [ -e "$f" ] || [ "$(ls "$f".part*of"$k" | wc -l)" -lt "$k" ] ||
    for j in $(seq "$k"); do cat "$f.part${j}of$k"; done > "$f"
  if [ -e "$f" ]; then rm -f "$f".part*of"$k"; fi
done
[ -d .site/fastai ] ||
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl_gpu/*.whl
case $phase in
install)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
  python3 -c 'import fastai, torch, triton; print(fastai.__version__, torch.__version__, triton.__version__)' |
    tee -a "$log"; du -sh data_em_* | tee -a "$log" ;;
checks)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$log"
  for lag in 1 0; do      # CaptureStep's lag_loss: fastai reads the previous step's loss (1) or syncs on its own (0)
    step 130 python3 kernels/fastai_loop.py --task finetune --archs affmae_base,vitmae_base,unet --bs 8 \
      --data data_em_a/drosophila-vnc --lag-loss $lag --out "$OUT/fastai_loop_finetune_lag$lag.json"
    step 100 python3 kernels/fastai_loop.py --archs affmae_base,vitmae_base --bs 16 --lag-loss $lag \
      --out "$OUT/fastai_loop_pretrain_lag$lag.json"
  done ;;
pretrain)
  t=$1; shift
  step "$t" python3 kernels/real_em.py --data "${PRE_DATA:-data_em_a,data_em_s,data_em_d,data_em_e}" --out "$OUT" \
    --pretrain-only --save-pretrained runs/pre --budget "$(( t - 15 ))" --pre-frac 0.85 "$@" ;;
finetune)
  t=$1 data=$2 sets=$3; shift 3
  step "$t" python3 kernels/real_em.py --data "$data" --sets "$sets" --out "$OUT" --load-pretrained runs/pre \
    --compare-head '' --budget "$(( t - 15 ))" "$@" ;;
esac
echo "== $(date -u +%T) done" >> "$log"
