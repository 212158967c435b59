"""One pretraining against another, fine-tuned alike (real EM run 26: HOG against pixel targets): pretrained
AFFMAE-Base from each, paired by set, label fraction and draw (`affmae.real_em.paired_pretrainings`); per set the mean
difference, its Student-t interval (`--level`, default 95 %) and the pairs won (`paired_summary`). Each side is one or
more run folders, read as `rescore_real_em.py` reads them (`load_run`); every folder's fine-tuning must match (checked:
head, steps, loss, class weights, augmentation, foreground crops and the pretrained runs' lr), and each side's
pretraining settings are recorded with the pairs.

    PYTHONPATH=. python kernels/pair_pretrainings.py \\
        kernels/results/real_em_run26 kernels/results/real_em_run26_100pct \\
        --against kernels/results/real_em_run26_pixels kernels/results/real_em_run26_pixels_100pct \\
        --out kernels/results/real_em_run26_hog_vs_pixels.json
"""
import argparse, json, sys
from pathlib import Path
from affmae.real_em import load_run, paired_pretrainings, paired_summary

MODEL = ('affmae_base', 'pretrained', None)
FINETUNE = ('head', 'ft_steps', 'loss', 'class_weights', 'augment', 'fg_crop')
PRETRAIN = ('pre_target', 'pre_steps', 'pre_sets', 'pre_unlabelled', 'mask', 'balance', 'pre_augment', 'pre_image_path')

def finetuning(res):
    "The fine-tuning settings that must match, with the lr of `MODEL`'s runs."
    lr = sorted({r['lr'] for s in res['sets'].values() for r in s['runs'] if (r['arch'], r['init'], r.get('variant'))
                 == MODEL})
    return {k: res['args'].get(k) for k in FINETUNE} | dict(lr=lr)

def pretraining(res):
    "The settings of the pretraining that `res`'s runs were fine-tuned from."
    args = res.get('pretrained_in', {}).get('args', res['args'])
    return {k: args.get(k) for k in PRETRAIN}

p = argparse.ArgumentParser()
p.add_argument('runs', nargs='+', help="run folders fine-tuned from the first pretraining")
p.add_argument('--against', nargs='+', required=True, help="run folders fine-tuned alike from the second")
p.add_argument('--out', required=True, help="the JSON file to write")
p.add_argument('--level', type=float, default=0.95, help="the intervals' confidence level")
a = p.parse_args()
if not 0 < a.level < 1: sys.exit(f"--level must be in (0, 1), got {a.level}")
sides = {}
for name, folders in (('runs', a.runs), ('against', a.against)):
    try: sides[name] = {Path(f).name: load_run(f) for f in folders}
    except ValueError as e: sys.exit(str(e))
    except (KeyError, TypeError) as e: sys.exit(f"{folders}: not kernels/real_em.py results (no {e})")
ft = {f: finetuning(r) for s in sides.values() for f, r in s.items()}
if len({json.dumps(v, sort_keys=True) for v in ft.values()}) > 1: sys.exit(f"the runs' fine-tuning differs: {ft}")
pairs = paired_pretrainings(list(sides['runs'].values()), list(sides['against'].values()), MODEL)
if not pairs: sys.exit("no set, label fraction and draw holds a pretrained run on both sides")
out = dict(runs=list(sides['runs']), against=list(sides['against']), model=list(MODEL),
           finetuning=next(iter(ft.values())),
           pretraining={k: [pretraining(r) for r in s.values()] for k, s in sides.items()}, pairs=pairs, level=a.level,
           summary=paired_summary(pairs, a.level))
tmp = Path(a.out).with_suffix('.part')                 # written whole, then renamed: never half a file
tmp.write_text(json.dumps(out, indent=1) + '\n'); tmp.replace(a.out)
print('wrote', a.out, {n: f"{s['mean']:+.3f} ({s['won']} of {s['n']} pairs won)" for n, s in out['summary'].items()})
