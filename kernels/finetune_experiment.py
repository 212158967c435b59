"""Segmentation experiment (issue 7): pretrained vs from scratch, AFFMAE vs ViT-MAE, 10 % and 100 % of the labels.

On synthetic EM (affmae.synth.synth_em) at --size (512 by default):
1. brief MAE pretraining of `affmae_base` and `vitmae_base` (plain loop: bf16 autocast, fused AdamW, warm-up + cosine,
   clipping, 50 % Perlin masks) on an unlabelled pool of synthetic images (seed 1), the same number of steps for both;
2. eight fine-tuning runs through `affmae.finetune.seg_learner` (CE + Dice, bf16, one-cycle, layer-wise lr decay 0.75
   for pretrained encoders): {affmae_base, vitmae_base} x {pretrained, scratch} x {10 %, 100 %} of 64 labelled
   images (seed 0), all with the same number of steps and batch size;
3. mIoU and per-class IoU on 8 held-out labelled images (whole 512² images, never trained on).
Step counts are set from measured step times so the whole script fits --budget seconds.

Run from the repository root:  PYTHONPATH=.:$PYTHONPATH python kernels/finetune_experiment.py --out DIR [--budget S]
(`--cpu-smoke` runs everything tiny on the CPU to check the script.)
"""
import argparse, json, math, time, warnings
from pathlib import Path
import torch
warnings.filterwarnings('ignore')

p = argparse.ArgumentParser()
p.add_argument('--out', default='runs/seg_experiment')
p.add_argument('--budget', type=float, default=450.)
p.add_argument('--size', type=int, default=512)
p.add_argument('--bs', type=int, default=8)
p.add_argument('--lr-decay', type=float, default=0.75, help='layer-wise lr decay for pretrained encoders (0 = off)')
p.add_argument('--inits', default='pretrained,scratch', help='which initialisations to fine-tune')
p.add_argument('--pre-steps', type=int, default=None, help='pretraining steps (default: from the budget)')
p.add_argument('--ft-steps', type=int, default=None, help='fine-tuning steps per run (default: from the budget)')
p.add_argument('--cpu-smoke', action='store_true')
a = p.parse_args()
t0 = time.time()
smoke = a.cpu_smoke
dev = 'cpu' if smoke else 'cuda'
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
S, bs = (48, 4) if smoke else (a.size, a.bs)
archs = ['affmae_tiny', 'vitmae_tiny'] if smoke else ['affmae_base', 'vitmae_base']
fracs = [0.1, 1.0]
res = dict(device='cpu' if smoke else torch.cuda.get_device_name(), torch=torch.__version__,
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), size=S, bs=bs, runs=[], pretrain={}, timing={})
def log(*x): print(f'[{time.time() - t0:6.1f}s]', *x, flush=True)
def sync():
    if dev == 'cuda': torch.cuda.synchronize()

from affmae.data import segment_dls, pretrain_dls
from affmae.synth import EM_CLASSES
from affmae.registry import create_model
from affmae.seg_models import backbone
from affmae.finetune import finetune_grid, grid_table, plot_grid

# data: 64 labelled training images + 8 held out (seed 0); an unlabelled pretraining pool (seed 1)
n_lab, n_pre = (4, 8) if smoke else (64, 96)
kw = dict(device=dev)                              # synthetic images are generated on `dev`
t = time.time()
pdl = pretrain_dls('synthetic', size=S, bs=bs, n_synth=n_pre, valid_pct=0, seed=1, epoch_len=bs * 200, **kw)
D = segment_dls(None, size=S, bs=bs, n_synth=n_lab, valid_pct=(2 if smoke else 8) / n_lab, seed=0, **kw)
def forever(dl):
    while True: yield from dl
res['timing']['data_s'] = time.time() - t
log('data', res['timing']['data_s'])

def pre_step_fn(arch):
    m = backbone(arch).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(.9, .95), weight_decay=.05, fused=dev == 'cuda')
    def step(img, lr):
        for g in opt.param_groups: g['lr'] = lr
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == 'cuda'):
            loss = m(img)['loss']
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss.detach()
    return m, step

def timed(f, n):
    sync(); t = time.perf_counter()
    for _ in range(n): f()
    sync(); return (time.perf_counter() - t) / n

# measure pretraining and fine-tuning step times (after warm-up: Triton compiles, cudnn picks)
batches = forever(pdl.train)
img = next(batches)[0]
for arch in archs:
    m, step = pre_step_fn(arch)
    timed(lambda: step(img, 1e-4), 2)
    res['timing'][f'{arch}_pretrain_step_s'] = timed(lambda: step(img, 1e-4), 3)
    del m, step
    sm = create_model(arch, 'segmentation', n_classes=len(EM_CLASSES)).to(dev)
    o = torch.optim.AdamW(sm.parameters(), lr=1e-4, fused=dev == 'cuda')
    y = torch.randint(0, 5, (bs, S, S), device=dev)
    def ft():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == 'cuda'):
            l = torch.nn.functional.cross_entropy(sm(img).float(), y)
        l.backward(); o.step(); o.zero_grad(set_to_none=True)
    if dev == 'cuda': torch.cuda.reset_peak_memory_stats()
    timed(ft, 2)
    res['timing'][f'{arch}_finetune_step_s'] = timed(ft, 3)
    res['timing'][f'{arch}_finetune_peak_gib'] = torch.cuda.max_memory_allocated() / 2**30 if dev == 'cuda' else None
    res['timing'][f'{arch}_seg_params_m'] = sum(q.numel() for q in sm.parameters()) / 1e6
    del sm, o
    if dev == 'cuda': torch.cuda.empty_cache()
    log(arch, {k: v for k, v in res['timing'].items() if k.startswith(arch)})

# budget: 30 % of what is left to pretraining, the rest to the 8 fine-tuning runs (fastai overhead ~15 %, eval, slack)
left = a.budget - (time.time() - t0) - (5 if smoke else 45)
t_pre = sum(res['timing'][f'{x}_pretrain_step_s'] for x in archs)
t_ft = sum(res['timing'][f'{x}_finetune_step_s'] for x in archs)
pre_steps = max(10, int(0.3 * left / t_pre / 1.05))
ft_steps = max(10, int(0.7 * left / (2 * len(fracs) * t_ft * 1.25)))
if smoke: pre_steps, ft_steps = 10, 10
pre_steps, ft_steps = a.pre_steps or pre_steps, a.ft_steps or ft_steps
res.update(pretrain_steps=pre_steps, finetune_steps=ft_steps)
log(f'{pre_steps} pretraining steps per arch, {ft_steps} fine-tuning steps per run')

# 1. pretraining
states = {}
for arch in archs:
    torch.manual_seed(0)
    m, step = pre_step_fn(arch)
    warm, peak = max(1, pre_steps // 10), 1e-3 if 'affmae' in arch else 6e-4
    losses, t = [], time.time()
    for i in range(pre_steps):
        lr = (peak * (i + 1) / warm if i < warm
              else peak * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, pre_steps - warm))))
        losses.append(step(next(batches)[0], lr))
    losses = torch.stack(losses).float().cpu().tolist()
    res['pretrain'][arch] = dict(steps=pre_steps, lr=peak, seconds=time.time() - t, loss_first10=sum(losses[:10]) / 10,
                                 loss_last10=sum(losses[-10:]) / 10)
    states[arch] = {k: v.detach().cpu() for k, v in m.state_dict().items()}
    del m, step
    if dev == 'cuda': torch.cuda.empty_cache()
    log('pretrained', arch, res['pretrain'][arch])

# 2. fine-tuning runs (affmae.finetune.finetune_grid), 3. held-out scores
res.update(lr_decay=a.lr_decay, inits=a.inits)
res['runs'] = finetune_grid(D, archs, pretrained=states, fracs=fracs, steps=ft_steps, lr=1e-3,
                            lr_decay=a.lr_decay or None, inits=tuple(a.inits.split(',')))
res['total_s'] = time.time() - t0
json.dump(res, open(out / 'seg_experiment.json', 'w'), indent=1)
print(grid_table(res['runs']))
import matplotlib; matplotlib.use('Agg')
plot_grid(res['runs'], title=f"held-out mIoU, synthetic EM {S}², {ft_steps} fine-tuning steps").figure.savefig(
    out / 'seg_experiment.png', dpi=100, bbox_inches='tight')
print(json.dumps(res))
