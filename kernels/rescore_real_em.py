"""Re-score a `kernels/real_em.py` run over the classes present in its held-out truth (`affmae.real_em.rescore`).

Runs recorded before `evaluate_model` averaged over the classes present kept a class that the held-out split lacks
in some models' means (IoU 0 where a model predicted it, none where it did not). Given the run's folder, with the
held-out pixels per class counted by `real_em.py --classes-only` (same `--data`) as `heldout_classes.json`, this
writes `present_classes.json` beside them: per results file (`real_em*.json`), every run's scores re-averaged and the
issue's targets (`check_targets`) read from them.

    python kernels/real_em.py --data data_em_a,data_em_c --classes-only --out /tmp/held
    cp /tmp/held/real_em.json kernels/results/real_em_run9/heldout_classes.json
    PYTHONPATH=. python kernels/rescore_real_em.py kernels/results/real_em_run9
"""
import argparse, json
from pathlib import Path
from affmae.real_em import load_results, rescore, check_targets

p = argparse.ArgumentParser()
p.add_argument('run', help="a run's folder of real_em*.json files and heldout_classes.json")
a = p.parse_args()
run = Path(a.run)
held = {n: s['test_class_pixels'] for n, s in load_results(run / 'heldout_classes.json')['sets'].items()}
out = dict(test_class_pixels=held, results={})
for f in sorted(run.glob('real_em*.json')):
    res = rescore(load_results(f), held)
    archs = [x for x in res['archs'] if x != 'unet']
    out['results'][f.name] = dict(sets={n: dict(classes=s['classes'], runs=s['runs']) for n, s in res['sets'].items()},
                                  targets=check_targets(res, *archs[:2]))
(run / 'present_classes.json').write_text(json.dumps(out, indent=1))
print('wrote', run / 'present_classes.json', {k: len(v['targets']) for k, v in out['results'].items()})
