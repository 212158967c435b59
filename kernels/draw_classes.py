"""What each fine-tuning draw of `kernels/real_em.py` holds: its labelled images and their classes (CPU, seconds).

`real_em.py --fracs F --ft-seeds S` fine-tunes on the training images `affmae.finetune.label_subset` draws with seed
S from `segment_dls` loaders of a set's training split. This script builds the same loaders on the same split, draws
the same images, and records per draw the images and the share of their labelled pixels in each class
(`class_frequencies`: what `--class-weights auto` weights by), so a run's per-draw scores can be read against what
its draw held; with `--crops N`, also the share of N training crops of `--size` that hold each class, for each
`--fg-crops` share of crops placed on a foreground pixel (`segment_dls(fg_crop)`; 0: random crops, as the runs so
far). One JSON file, written whole and then renamed.

    python kernels/draw_classes.py --data ../shared/data --fracs 0.1 --seeds 0,1,2,3 --crops 1000 \\
        --fg-crops 0,0.33 --out kernels/results/real_em_draws.json
"""
import argparse, json, random, sys, time
from pathlib import Path
import numpy as np

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument('--data', required=True, help='root folder of the labelled sets (`../shared/data` layout)')
p.add_argument('--sets', default='drosophila-vnc,sbem-mito,kidney-gbm')
p.add_argument('--fracs', default='0.1', help='label fractions, comma-separated')
p.add_argument('--seeds', default='0,1,2', help='draws (`--ft-seeds` of real_em.py), comma-separated')
p.add_argument('--crops', type=int, default=0, help='training crops to sample per draw and --fg-crops value')
p.add_argument('--size', type=int, default=256, help="crop side (real_em.py's --size)")
p.add_argument('--fg-crops', default='0', help='shares of crops placed on a foreground pixel, comma-separated')
p.add_argument('--out', required=True, help='JSON file to write')
a = p.parse_args()
# each set's training split as real_em.py reads it: a folder, less its last `held` images (drosophila-vnc's held out)
SPLITS = {'drosophila-vnc': ('.', 4), 'sbem-mito': ('training', 0), 'kidney-gbm': ('train', 0)}
try:
    fracs, seeds = [float(f) for f in a.fracs.split(',')], [int(s) for s in a.seeds.split(',')]
    fg_crops = [float(f) for f in a.fg_crops.split(',')]
except ValueError as e: sys.exit(f"--fracs, --seeds and --fg-crops take comma-separated numbers ({e})")
if not all(0 < f <= 1 for f in fracs): sys.exit(f"--fracs must lie in (0, 1], got {a.fracs}")
if not all(0 <= f <= 1 for f in fg_crops): sys.exit(f"--fg-crops must lie in [0, 1], got {a.fg_crops}")
if a.crops < 0 or a.size < 1: sys.exit(f"--crops must be >= 0 and --size >= 1, got {a.crops}, {a.size}")
names = [n for n in a.sets.split(',') if n]
if unknown := sorted(set(names) - set(SPLITS)):
    sys.exit(f"unknown set(s) {', '.join(unknown)}: known: {', '.join(SPLITS)}")
root = Path(a.data)
for n in names:
    if not (root / n / 'classes.txt').is_file(): sys.exit(f"{root / n}: no classes.txt (is --data the sets' root?)")

from affmae.data import segment_dls
from affmae.finetune import label_subset, class_frequencies

def crops_holding(tds, fg_crop, n_classes):
    "Share of `a.crops` training crops of `tds` (its drawn images) that hold each class, `fg_crop` of them placed."
    tds.fg_crop, held = fg_crop, np.zeros(n_classes)
    random.seed(0)
    for i in range(a.crops): held[np.unique(tds[i][2].numpy())] += 1
    return [round(h / a.crops, 4) for h in held]

def draws_of(name):
    "Each draw of set `name`: its seed, label fraction, images and class shares."
    classes = [l.strip() for l in (root / name / 'classes.txt').read_text().splitlines() if l.strip()]
    sub, held = SPLITS[name]
    dls = segment_dls(root / name / sub, size=a.size, bs=2, valid_pct=0, seed=0, codes=classes)
    tds = dls.train.dataset
    everything = list(tds.idxs)[:len(tds.idxs) - held]                  # the images real_em.py trains on
    files = [f.name for f, *_ in tds.src.files]
    draws = []
    for frac in fracs:
        for seed in seeds:
            tds.idxs = list(everything)
            label_subset(dls, frac, seed)
            share = class_frequencies(dls, len(classes))
            draws.append(dict(label_frac=frac, seed=seed, images=[files[j] for j in tds.idxs],
                              share={c: round(float(s), 6) for c, s in zip(classes, share)}))
            if a.crops:
                draws[-1]['crops_holding'] = {f'{fg:g}': crops_holding(tds, fg, len(classes)) for fg in fg_crops}
    tds.idxs = list(everything)
    return dict(classes=classes, n_train=len(everything), draws=draws)

res = dict(date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), command=' '.join(sys.argv), sets={})
for name in names:
    try: res['sets'][name] = draws_of(name)
    except Exception as e: sys.exit(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    draws = res['sets'][name]['draws']
    print(name, *(f"seed {d['seed']} ({d['label_frac']:.0%}): {', '.join(d['images'])}" for d in draws), sep='\n  ')
out = Path(a.out)
out.parent.mkdir(parents=True, exist_ok=True)
part = out.with_name(out.name + '.part')
part.write_text(json.dumps(res, indent=1)); part.replace(out)
print('wrote', out)
