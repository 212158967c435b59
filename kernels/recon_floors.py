"""What a masked reconstruction can reach on real EM without learning (CPU, about a minute): per set and mask kind,
the masked-patch MSE of the trivial prediction (the dataset mean) and of `affmae.real_em.recon_levels`' best Gaussian
inpainting of the visible pixels, on random 256² training crops (dihedral flips, each set's own normalisation); and per
set, the share of the pixel variance at scales finer than sigma (the MSE of the whole image's own blur).

    PYTHONPATH=. python kernels/recon_floors.py ../shared/data --out kernels/results/recon_floors.json
"""
import argparse, json, random, time
from pathlib import Path
import torch
from affmae.data import pretrain_dls
from affmae.registry import create_model
from affmae.real_em import blur_inpaint, recon_levels

SETS = {'drosophila-vnc': 'images', 'sbem-mito': 'training', 'kidney-gbm': 'train', 'podocyte-tem': '.'}
p = argparse.ArgumentParser()
p.add_argument('data', help='root holding the sets (the layout of ../shared/data)')
p.add_argument('--out', default='runs/recon_floors.json')
p.add_argument('--masks', default='perlin,perlin_quarters,random')
p.add_argument('--size', type=int, default=256)
p.add_argument('--crops', type=int, default=64, help='crops per set')
a = p.parse_args()
res = dict(command='python kernels/recon_floors.py ' + ' '.join(f'--{k} {v}' for k, v in vars(a).items()
                                                                 if k not in ('data', 'out')),
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), size=a.size, crops=a.crops, sets={})
for name, sub in SETS.items():
    path = Path(a.data) / name / sub
    if not path.is_dir(): print(f'{name}: not under {a.data}, skipped'); continue
    random.seed(0); torch.manual_seed(0)
    dls = pretrain_dls(path, size=a.size, bs=16, valid_pct=0, seed=0, device='cpu', epoch_len=a.crops)
    batches = list(dls.train)
    x = torch.cat([b[0] for b in batches])
    var = float((x**2).mean())
    r = res['sets'][name] = dict(n_images=len(dls.src), variance=var, finer_than={
        s: float(((blur_inpaint(x, torch.ones_like(x), s) - x)**2).mean())/var for s in (1, 2, 4, 8)}, masks={})
    for mk in a.masks.split(','):
        r['masks'][mk] = recon_levels(create_model('affmae_tiny', mask=mk), batches)
        l = r['masks'][mk]
        print(f"{name:15s} {mk:16s} trivial {l['trivial']:.3f}  best blur {l['floor']:.3f} (sigma {l['floor_sigma']})"
              f"  = {l['floor']/l['trivial']:.2f} x trivial")
    print(f"{name:15s} variance finer than sigma px:", {s: round(v, 2) for s, v in r['finer_than'].items()})
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
Path(a.out).write_text(json.dumps(res, indent=1))
