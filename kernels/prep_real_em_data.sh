#!/usr/bin/env bash
# The data folders of a real-EM round (`session_real_em.sh`), from the sets' folder (default ../shared/data), into
# git-ignored folders of the repository root (replaced); a folder too large to travel in one device call beside the
# tree is also split into parts that do (`split_carry.py`: data_em_e_p1, data_em_e_p2, ...):
#   data_em_a  drosophila-vnc: training sections cut to 640², the held-out ones (16-19) whole (all five classes)
#   data_em_s  drosophila-vnc's unlabelled 20-plane stack, cut to 640²
#   data_em_d  sbem-mito (training, validation, unlabelled) and kidney-gbm's held-out split, cut to 512²
#   data_em_e  kidney-gbm's 100 training tiles (512²)
# Pretraining reads data_em_a, _s, _d and _e; fine-tuning reads data_em_a (drosophila-vnc), data_em_d and _e.
# --clahe: every image CLAHE-equalised (the published preprocessing, `affmae.prep.clahe`; OpenCV runs here, the GPU
# machine lacks it), the podocyte micrographs too (into data_em_s, whole), so a round sees no plain image.
#   bash kernels/prep_real_em_data.sh [--clahe] [../shared/data]
set -euo pipefail
eq=(); if [ "${1:-}" = --clahe ]; then eq=(--clahe); shift; fi
D=$(realpath "${1:-../shared/data}")
prep() { PYTHONPATH=. python3 kernels/prep_data_em.py "$@" "${eq[@]}"; }
rm -rf data_em_a data_em_s data_em_d data_em_e
prep "$D" data_em_a --max 640 --skip sbem-mito,kidney-gbm,podocyte-tem,unlabelled --full vnc16,vnc17,vnc18,vnc19
prep "$D/drosophila-vnc/unlabelled" data_em_s/drosophila-vnc/unlabelled --max 640 --skip ''
cp "$D/drosophila-vnc/classes.txt" data_em_s/drosophila-vnc/
[ ${#eq[@]} = 0 ] || prep "$D/podocyte-tem" data_em_s/podocyte-tem --max 1104 --skip ''
prep "$D/sbem-mito" data_em_d/sbem-mito --max 512 --skip ''
prep "$D/kidney-gbm/test" data_em_d/kidney-gbm/test --max 512 --skip ''
prep "$D/kidney-gbm/train" data_em_e/kidney-gbm/train --max 512 --skip ''
for d in data_em_d data_em_e; do cp "$D/kidney-gbm/classes.txt" $d/kidney-gbm/; done
python3 kernels/split_carry.py data_em_a data_em_s data_em_d data_em_e .whl_gpu    # what to carry, split to fit
