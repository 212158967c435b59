"""The published AFFMAE recipe against affmae's defaults, then one deviation at a time (a GPU script).

Each variant pretrains AFFMAE-Base for the same number of steps on every real EM image that is not held out (the
labelled sets' training splits and the podocyte TEM of `--data`), 256² crops, then fine-tunes the same segmentation
model from its encoder on drosophila-vnc (sections 0-15; 16-19 held out) with affmae's default fine-tuning, and scores
the held-out sections whole. Recorded per variant: the pretraining loss curve, the finest head's validation loss
against the trivial level (predicting the mean everywhere: E[x²] of the normalised pixels; heads differ between
variants, the finest is common to all), step time, peak memory, held-out mIoU and foreground IoU.

Variants: `ours` (defaults, with the 3-octave `perlin` masks that were the default when recorded), `paper` (the
preset: `affmae_base_paper`, `recipe='paper'`, CLAHE + fixed normalisation, quarter-lattice Perlin masks), and `ours`
with one published choice each: deep-supervision weights, mask family, conv stem, deformable decoder.

The published preprocessing is CLAHE (OpenCV) before the fixed normalisation. The GPU machine has no OpenCV, so the
`paper` variant reads `--paper-data`, a copy of `--data` equalised here by `kernels/prep_data_em.py --clahe` (same
files, CLAHE on the 512² crops), and applies the fixed normalisation itself; without `--paper-data` it applies CLAHE
while loading (`clahe=4`).

Writes `ablation_recipe.json` (rewritten after every variant) and `ablation_recipe.png` to `--out`.
  PYTHONPATH=. python kernels/prep_data_em.py data_em data_em_abl --limit 20 --skip unlabelled,test,validation
  PYTHONPATH=. python kernels/prep_data_em.py data_em data_em_abl_clahe --limit 20 \
      --skip unlabelled,test,validation --clahe
  PYTHONPATH=.:$PYTHONPATH python kernels/ablation_recipe.py --data data_em_abl --paper-data data_em_abl_clahe \
      --out $OUT --budget 300
  PYTHONPATH=. python kernels/ablation_recipe.py --data ../shared/data --out /tmp/ablation --tiny   # CPU check
"""
import argparse, gc, json, tempfile, time, warnings
from pathlib import Path
import numpy as np, torch
warnings.filterwarnings('ignore')

p = argparse.ArgumentParser()
p.add_argument('--data', default='data_em',
               help='root holding drosophila-vnc/, kidney-gbm/, sbem-mito/, podocyte-tem/')
p.add_argument('--out', default='runs/ablation_recipe')
p.add_argument('--paper-data', default=None, help='a CLAHE-equalised copy of --data for the paper variant')
p.add_argument('--budget', type=float, default=300., help='seconds; variants that would not fit are skipped')
p.add_argument('--variants', default='ours,paper,ds_paper,mask_quarters,conv_stem,deformable')
p.add_argument('--pre-steps', type=int, default=200)
p.add_argument('--ft-steps', type=int, default=80)
p.add_argument('--size', type=int, default=256)
p.add_argument('--pre-bs', type=int, default=32)
p.add_argument('--bs', type=int, default=8)
p.add_argument('--lr', type=float, default=1e-3, help="peak pretraining lr of our recipe (the preset sets its own)")
p.add_argument('--tiny', action='store_true', help='affmae_tiny, 64² crops, a few steps on the CPU: checks the script')
p.add_argument('--seed', type=int, default=0)
a = p.parse_args()
t0 = time.time()
dev = 'cuda' if torch.cuda.is_available() and not a.tiny else 'cpu'
S, PB, B = (64, 4, 4) if a.tiny else (a.size, a.pre_bs, a.bs)
PRE, FT = (3, 3) if a.tiny else (a.pre_steps, a.ft_steps)
SIZE = 'tiny' if a.tiny else 'base'
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from affmae.data import pretrain_dls, segment_dls, EMFolder, read_classes
from affmae.learner import mae_learner
from affmae.mae import PAPER_ENCODER, PAPER_DECODER
from affmae.finetune import seg_learner
from affmae.inference import evaluate_model
from fastai.callback.core import Callback

from affmae.prep import PAPER_STATS, CLAHE_CLIP
PAPER_DATA = dict(norm=PAPER_STATS) if a.paper_data else dict(clahe=CLAHE_CLIP, norm=PAPER_STATS)
PAPER_MODEL = {**PAPER_ENCODER, **PAPER_DECODER, **(dict(dec_dim=64, dec_heads=2) if a.tiny else {})}
OURS = dict(mask='perlin')   # the masks of `ours` when recorded (affmae's default then; now `perlin_quarters`)
VARIANTS = {   # name: (arch, model options, learner options, data options); `paper` is `affmae_*_paper` spelled out
    'ours': (f'affmae_{SIZE}', {}, OURS, {}),
    'paper': (f'affmae_{SIZE}', PAPER_MODEL, dict(recipe='paper', mask='perlin_quarters'), PAPER_DATA),
    'ds_paper': (f'affmae_{SIZE}', dict(ds_weights=(.05, .12, 0., 1.)), OURS, {}),
    'mask_quarters': (f'affmae_{SIZE}', {}, dict(mask='perlin_quarters'), {}),
    'conv_stem': (f'affmae_{SIZE}', dict(stem='conv'), OURS, {}),
    'deformable': (f'affmae_{SIZE}', dict(decoder='deformable'), OURS, {}),
}
names = a.variants.split(',')
if bad := [n for n in names if n not in VARIANTS]: raise SystemExit(f'unknown variants {bad}; known: {list(VARIANTS)}')

def log(*x): print(f'[{time.time() - t0:6.1f}s]', *x, flush=True)
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
res = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu', torch=torch.__version__,
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), args=vars(a), size=S, pretrain_bs=PB, bs=B,
           pretrain_steps=PRE, finetune_steps=FT, finetune_set='drosophila-vnc', variants={})
def save(): (out / 'ablation_recipe.json').write_text(json.dumps(res, indent=1))

# ---- data: pretraining images (nothing held out), drosophila-vnc split by section index (links in a work folder) ----
work = Path(tempfile.mkdtemp(prefix='ablation_'))

def prepare(root: Path, tag: str) -> dict:
    "Links to `root`'s drosophila-vnc split by section (train, test); the pretraining folders (its train split too)."
    dros = root / 'drosophila-vnc'
    pairs = [(f, m) for f, m, _, _ in EMFolder(dros, masks=True).files]
    split = dict(train=pairs[:3], test=pairs[-1:]) if a.tiny else dict(train=pairs[:-4], test=pairs[-4:])
    for part, ps in split.items():
        for sub in ('images', 'masks'): (work / tag / part / sub).mkdir(parents=True)
        for f, m in ps:
            (work / tag / part / 'images' / f.name).symlink_to(f.resolve())
            (work / tag / part / 'masks' / m.name).symlink_to(m.resolve())
        (work / tag / part / 'classes.txt').symlink_to((dros / 'classes.txt').resolve())
    others = (root / 'kidney-gbm' / 'train', root / 'sbem-mito' / 'training', root / 'podocyte-tem')
    pre = [work / tag / 'train' / 'images'] + [d for d in others if d.is_dir()]
    return dict(train=work / tag / 'train', test=work / tag / 'test', pretrain=pre)

DATA = dict(plain=prepare(Path(a.data), 'plain'))
if a.paper_data: DATA['paper'] = prepare(Path(a.paper_data), 'paper')
classes = read_classes(DATA['plain']['train'])
res['pretrain_data'] = {k: [str(d) for d in v['pretrain']] for k, v in DATA.items()}

def finetune(state, data, data_kw, model_kw):
    "Fine-tune the segmentation model (encoder options `model_kw`) from `state`, a pretrained MAE state dict; scores."
    dls = segment_dls(data['train'], size=S, bs=B, valid_pct=0, seed=a.seed, device=dev, codes=classes,
                      epoch_len=B * FT, **data_kw)
    torch.manual_seed(a.seed)
    learn = seg_learner(dls, f'affmae_{SIZE}', pretrained=state, classes=classes, lr_decay=.75, per_class=False,
                        **model_kw)
    t = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    train_s = time.time() - t
    rec = dict(classes=classes, stats=dls.stats, tile=S)
    sc = evaluate_model(learn.model.eval(), EMFolder(data['test'], masks=True), rec, overlap=.25, bs=16, device=dev)
    return dict(miou=sc['miou'], fg_iou=sc['fg_miou'], train_s=round(train_s, 1))

class EpochTimer(Callback):
    "Milliseconds per training step of the last epoch (the first pays for compilation, autotuning and capture)."
    def before_epoch(self): self.t, self.n = time.time(), 0
    def after_batch(self): self.n += self.training
    def after_epoch(self):
        if dev == 'cuda': torch.cuda.synchronize()
        self.step_ms = round(1e3 * (time.time() - self.t) / max(self.n, 1), 1)   # validation included

def free():
    gc.collect()
    if dev == 'cuda': torch.cuda.empty_cache()

per_variant = None
for name in names:
    left = a.budget - (time.time() - t0)
    if per_variant and left < 1.2 * per_variant:
        res.setdefault('skipped', []).append(name); log(f'{name}: skipped, {left:.0f} s left'); continue
    tv = time.time()
    arch, model_kw, learn_kw, data_kw = VARIANTS[name]
    torch.manual_seed(a.seed)
    data = DATA['paper' if name == 'paper' and a.paper_data else 'plain']
    dls = pretrain_dls(data['pretrain'], size=S, bs=PB, valid_pct=.05, seed=a.seed, device=dev,
                       epoch_len=PB * PRE // 2, **data_kw)
    with torch.no_grad(): trivial = float(np.mean([(x.float() ** 2).mean().item() for x, in dls.valid]))
    lkw = (dict(lr=a.lr) if 'recipe' not in learn_kw else {}) | learn_kw
    learn = mae_learner(dls, arch, **lkw, **model_kw)
    free()                                                  # earlier variants' memory (their graphs) is gone
    if dev == 'cuda': torch.cuda.reset_peak_memory_stats()
    t, timer = time.time(), EpochTimer()
    with learn.no_bar(), learn.no_logging(): learn.fit_recipe(2, cbs=[timer])
    secs = time.time() - t
    vals = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    finest = vals.get(f'loss_{learn.model.head_names[-1]}', vals['valid_loss'])
    row = dict(arch=arch, model_kw={k: list(v) if isinstance(v, tuple) else v for k, v in model_kw.items()},
               learner_kw=learn_kw, data_kw={k: list(v) if isinstance(v, tuple) else v for k, v in data_kw.items()},
               n_params=sum(p.numel() for p in learn.model.parameters()), pretrain_s=round(secs, 1),
               step_ms=timer.step_ms, trivial=trivial, finest_valid=float(finest),
               finest_rel=float(finest) / trivial, valid=vals, train_loss=[float(l) for l in learn.recorder.losses],
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == 'cuda' else None)
    state = {k: v.detach().cpu() for k, v in learn.model.state_dict().items()}
    del learn, dls
    free()
    row |= finetune(state, data, data_kw, model_kw)
    res['variants'][name] = row; save()
    per_variant = time.time() - tv
    log(f"{name}: finest head {row['finest_rel']:.3f} of trivial, {row['step_ms']} ms/step, peak {row['peak_gib']}"
        f" GiB, held-out mIoU {row['miou']:.3f} fg IoU {row['fg_iou']:.3f}")

res['total_s'] = round(time.time() - t0, 1); save()
done = list(res['variants'])
fig, axs = plt.subplots(1, 3, figsize=(13, 3.5))
for n in done: axs[0].plot(res['variants'][n]['train_loss'], label=n, lw=.8)
axs[0].set(title='pretraining loss (weighted heads)', xlabel='step'); axs[0].legend(fontsize=7)
axs[1].bar(done, [res['variants'][n]['finest_rel'] for n in done]); axs[1].axhline(1, c='k', lw=.5)
axs[1].set(title='finest head, valid / trivial')
axs[2].bar(done, [res['variants'][n]['miou'] for n in done]); axs[2].set(title='held-out mIoU after fine-tuning')
for ax in axs[1:]: ax.tick_params(axis='x', rotation=30, labelsize=7)
fig.tight_layout(); fig.savefig(out / 'ablation_recipe.png', dpi=90)
log('done:', out / 'ablation_recipe.json')
