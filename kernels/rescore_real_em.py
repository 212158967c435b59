"""The issue's targets read off a `kernels/real_em.py` run's results files, re-scored over the classes present first
where the run predates that.

Runs recorded before `evaluate_model` averaged over the classes present kept a class that the held-out split lacks
in some models' means (IoU 0 where a model predicted it, none where it did not). Given the run's folder, with the
held-out pixels per class counted by `real_em.py --classes-only` (same `--data`) as `heldout_classes.json`, this
writes `present_classes.json` beside them: per results file (`real_em*.json`), every run's scores re-averaged and the
issue's targets (`check_targets`) read from them. A folder without `heldout_classes.json` (runs that already average
over the classes present) gets `targets.json`: the same, scores as recorded. Either way a file whose pretrained models
were also fine-tuned as a variant (`--compare-lr`, `--compare-head`) adds that variant's targets (`variant_targets`),
and a folder of several draws (`--ft-seeds`, a file each) adds the targets on each model's mean over them
(`over_draws`: `merge_draws` of the files in name order, each set's draw counted once), and so do the variants
whose pretrained runs it holds, each beside the main runs of its own draws (`over_draws_variants`).

    python kernels/real_em.py --data data_em_a,data_em_c --classes-only --out /tmp/held
    cp /tmp/held/real_em.json kernels/results/real_em_run9/heldout_classes.json
    PYTHONPATH=. python kernels/rescore_real_em.py kernels/results/real_em_run9     # present_classes.json
    PYTHONPATH=. python kernels/rescore_real_em.py kernels/results/real_em_run10    # targets.json
"""
import argparse, json
from pathlib import Path
from affmae.real_em import load_results, rescore, check_targets, merge_draws

def variants_of(res):
    "The variants (`--compare-*`) that `res`'s runs hold, sorted."
    return sorted({r['variant'] for s in res['sets'].values() for r in s['runs'] if r.get('variant')})

def only_draws_of(res, variant):
    "`res` with only the draws (set, seed) that hold a run of `variant`: a variant judged on the main runs beside it."
    keep = {(n, r['seed']) for n, s in res['sets'].items() for r in s['runs'] if r.get('variant') == variant}
    return dict(res, sets={n: dict(s, runs=[r for r in s['runs'] if (n, r['seed']) in keep])
                           for n, s in res['sets'].items()})

p = argparse.ArgumentParser()
p.add_argument('run', help="a run's folder of real_em*.json files (and heldout_classes.json, to re-score)")
a = p.parse_args()
run = Path(a.run)
held_file = run / 'heldout_classes.json'
held = ({n: s['test_class_pixels'] for n, s in load_results(held_file)['sets'].items()}
        if held_file.exists() else None)
out, files = dict(test_class_pixels=held, results={}), []
for f in sorted(run.glob('real_em*.json')):
    res = rescore(load_results(f), held) if held else load_results(f)
    files.append(res)
    archs = [x for x in res['archs'] if x != 'unet']
    rec = dict(sets={n: dict(classes=s['classes'], runs=s['runs']) for n, s in res['sets'].items()},
               targets=check_targets(res, *archs[:2]))
    if variants := variants_of(res):
        rec['variant_targets'] = {v: check_targets(res, *archs[:2], variant=v) for v in variants}
    out['results'][f.name] = rec
merged = merge_draws(*files)
if len({r['seed'] for s in merged['sets'].values() for r in s['runs']}) > 1:
    archs = [x for x in merged['archs'] if x != 'unet']
    out['over_draws'] = check_targets(merged, *archs[:2])
    targets = {v: check_targets(only_draws_of(merged, v), *archs[:2], variant=v) for v in variants_of(merged)}
    if any(targets.values()): out['over_draws_variants'] = {v: t for v, t in targets.items() if t}
dest = run / ('present_classes.json' if held else 'targets.json')
dest.write_text(json.dumps(out, indent=1))
print('wrote', dest, {k: len(v['targets']) for k, v in out['results'].items()})
