"""Pretrained AFFMAE-Base against its twin from scratch and against the U-Net, pooled over several real-EM runs of one
fine-tuning recipe: every draw of every run a pair (`paired_diffs`), per set the mean difference, its Student-t
interval (`--level`, default 95 %) and the pairs won (`paired_summary`). Each run's folder is read as
`rescore_real_em.py` reads it (`load_run`: its `real_em*.json` files merged in name order); the folders must share
the recipe (checked: the head, the fine-tuning steps and label fractions, each model's lr, the loss, class weights,
augmentation and foreground crops, whether pretraining trained the head's image path, and whether the pretrained
runs were normalised as in pretraining).

    PYTHONPATH=. python kernels/pool_real_em.py kernels/results/real_em_run{15,16,17,18} \\
        --out kernels/results/real_em_pooled.json
"""
import argparse, json, sys
from pathlib import Path
from affmae.real_em import load_run, per_draw, paired_diffs, paired_summary

MODELS = {'pretrained': ('affmae_base', 'pretrained', None), 'scratch': ('affmae_base', 'scratch', None),
          'unet': ('unet', 'scratch', None)}

def recipe(res):
    """What must match across the pooled runs: head, steps, label fractions, each main model's lr, and the loss,
    class weights, augmentation, foreground crops, image-path pretraining and pretraining's normalisation (defaults
    where older runs lack them)."""
    lrs = {k: sorted({d[m]['lr'] for d in per_draw(res).values() if m in d}) for k, m in MODELS.items()}
    args, pre_args = res['args'], res.get('pretrained_in', {}).get('args', res['args'])
    return dict(head=args['head'], ft_steps=args['ft_steps'], fracs=args['fracs'], lr=lrs,
                loss=args.get('loss', 'ce_dice'), class_weights=args.get('class_weights', ''),
                augment=args.get('augment', 'flips'), fg_crop=args.get('fg_crop', 0.),
                pre_image_path=pre_args.get('pre_image_path', False), pre_stats=args.get('pre_stats', False))

p = argparse.ArgumentParser()
p.add_argument('runs', nargs='+', help="run folders of real_em*.json files, one fine-tuning recipe")
p.add_argument('--out', required=True, help="the JSON file to write")
p.add_argument('--level', type=float, default=0.95, help="the intervals' confidence level")
a = p.parse_args()
if not 0 < a.level < 1: sys.exit(f"--level must be in (0, 1), got {a.level}")
runs, recipes = {}, {}
for folder in map(Path, a.runs):
    try:
        runs[folder.name] = load_run(folder)
        recipes[folder.name] = recipe(runs[folder.name])
    except ValueError as e: sys.exit(str(e))
    except (KeyError, TypeError) as e: sys.exit(f"{folder}: not kernels/real_em.py results (no {e})")
if len({json.dumps(r, sort_keys=True) for r in recipes.values()}) > 1: sys.exit(f"the runs' recipes differ: {recipes}")
pairs = {f'pretrained - {b}': paired_diffs(runs, MODELS['pretrained'], MODELS[b]) for b in ('scratch', 'unet')}
out = dict(runs=list(runs), recipe=next(iter(recipes.values())), pairs=pairs, level=a.level,
           summary={k: paired_summary(v, a.level) for k, v in pairs.items()})
tmp = Path(a.out).with_suffix('.part')                 # written whole, then renamed: never half a file
tmp.write_text(json.dumps(out, indent=1) + '\n'); tmp.replace(a.out)
print('wrote', a.out, {k: {n: f"{s['mean']:+.3f} ± {s['ci']:.3f} ({s['n']})" for n, s in v.items()}
                       for k, v in out['summary'].items()})
