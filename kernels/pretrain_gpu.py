"""GPU check of MAE pretraining (issue 6).

1. Step time and peak memory of `affmae_base` and `vitmae_base` at 512², bf16 autocast, fused AdamW, 50 % Perlin
   masking, batch 32 (16 if 32 does not fit): a plain training loop (forward, backward, clip, step), 3 warm-up
   steps, then the median of 10 CUDA-synchronised steps.
2. A short real pretraining run through `affmae.learner.mae_learner` (fastai, bf16, warm-up + cosine, clipping,
   figures, checkpoints) on synthetic EM crops, >= 2,000 steps: the largest of affmae_base/affmae_small at 256² whose
   measured step time fits the time left (`--archs`, at `--size`² with batch `--bs`); writes the last epoch's
   reconstruction figure.

Run from the repository root:  PYTHONPATH=.:$PYTHONPATH python kernels/pretrain_gpu.py --out DIR [--budget SECONDS]
(`--cpu-smoke` runs everything tiny on the CPU to check the script.)
"""
import argparse, json, shutil, statistics, time
from pathlib import Path
import torch
from affmae.registry import create_model

p = argparse.ArgumentParser()
p.add_argument('--out', default='runs/pretrain_gpu')
p.add_argument('--budget', type=float, default=420., help='seconds for the whole script')
p.add_argument('--steps', type=int, default=2000)
p.add_argument('--cpu-smoke', action='store_true')
p.add_argument('--skip-speed', action='store_true', help='skip part 1')
p.add_argument('--archs', default='affmae_base,affmae_small', help='part 2 candidates, largest first')
p.add_argument('--size', type=int, default=256, help='part 2 crop size')
p.add_argument('--bs', type=int, default=16, help='part 2 batch size')
p.add_argument('--lr', type=float, default=None)
p.add_argument('--norm-pix', type=int, default=0,
               help='1: MAE per-patch normalised targets (0, the default: raw pixels, see nbs/07_mae)')
a = p.parse_args()
t0 = time.time()
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
smoke = a.cpu_smoke
dev = 'cpu' if smoke else 'cuda'
res = dict(device=torch.cuda.get_device_name() if not smoke else 'cpu', torch=torch.__version__,
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), speed=[], run={})
print(res, flush=True)


def sync():
    if dev == 'cuda': torch.cuda.synchronize()


def step_time(arch, size, bs, n=10, warm=3):
    "Median ms/step and peak GiB of a bf16 training step of `arch` at `size`² with batch `bs`."
    torch.manual_seed(0)
    m = create_model(arch).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(.9, .95), weight_decay=.05, fused=True)
    img = torch.randn(bs, 1, size, size, device=dev)
    if dev == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    ts = []
    for i in range(warm + n):
        sync(); t = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == 'cuda'):
            loss = m(img)['loss']
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.)
        opt.step(); opt.zero_grad(set_to_none=True)
        sync(); ts.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == 'cuda' else float('nan')
    nparams = sum(q.numel() for q in m.parameters())
    del m, opt, img, loss
    if dev == 'cuda': torch.cuda.empty_cache()
    ms = statistics.median(ts[warm:]) * 1e3
    return dict(arch=arch, size=size, bs=bs, ms=ms, img_s=bs / ms * 1e3, peak_gib=peak, params_m=nparams / 1e6)


def try_speed(arch, size, bss, **kw):
    for bs in bss:
        try: return step_time(arch, size, bs, **kw)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache(); print(f'{arch} {size} bs {bs}: out of memory', flush=True)


# 1. 512² step time, both models
S = 64 if smoke else 512
for arch in [] if a.skip_speed else (['affmae_tiny', 'vitmae_tiny'] if smoke else ['affmae_base', 'vitmae_base']):
    r = try_speed(arch, S, [2] if smoke else [32, 16], n=2 if smoke else 10, warm=1 if smoke else 3)
    if r: res['speed'].append(r); print(r, flush=True)

# 2. the real run: pick the architecture whose 2,000 steps fit the time left
from affmae.data import pretrain_dls
from affmae.learner import mae_learner
size, bs = (64, 4) if smoke else (a.size, a.bs)
cands = ['affmae_tiny'] if smoke else a.archs.split(',')
t_data = time.time()
per_epoch = max(1, a.steps // 10)
dls = pretrain_dls('synthetic', size=size, bs=bs, n_synth=12 if smoke else 48, synth_size=2 * size,
                   epoch_len=bs * per_epoch, device=dev, seed=0)
res['run']['data_s'] = time.time() - t_data
arch = cands[-1]
for c in cands:
    r = step_time(c, size, bs, n=5, warm=2)
    left = a.budget - (time.time() - t0) - 40                     # figures, checkpoints, validation, slack
    est = r['ms'] / 1e3 * a.steps * 1.15                            # fastai's per-batch overhead
    print(f'{c}: {r["ms"]:.1f} ms/step at {size}² bs {bs}; {a.steps} steps ~ {est:.0f} s, {left:.0f} s left',
          flush=True)
    if est < left: arch = c; break
res['run'].update(arch=arch, size=size, bs=bs, steps=10 * per_epoch, epochs=10,
                  lr=a.lr or (1e-3 if 'small' in arch or smoke else 6e-4), norm_pix=bool(a.norm_pix),
                  mask='perlin', ratio=.5, precision='bf16', warmup=.1)
torch.manual_seed(0)
learn = mae_learner(dls, arch, mask=res['run']['mask'],
                    lr=res['run']['lr'], precision='bf16', ckpt_dir=out / 'ckpt', ckpt_every=10,
                    norm_pix=bool(a.norm_pix), figs_dir=out / 'figures')
t = time.time()
learn.fit_one_cycle(10, res['run']['lr'], pct_start=.1, moms=(.9, .9, .9))
res['run']['train_s'] = time.time() - t
res['run']['ms_per_step'] = res['run']['train_s'] / res['run']['steps'] * 1e3
res['run']['history'] = [[float(v) if v is not None else None for v in vals] for vals in learn.recorder.values]
res['run']['metric_names'] = list(learn.recorder.metric_names[1:-1])
shutil.copy(out / 'figures' / 'recon_009.png', out / 'recon_final.png')
shutil.copy(out / 'figures' / 'recon_000.png', out / 'recon_first.png')
res['total_s'] = time.time() - t0
json.dump(res, open(out / 'pretrain_gpu.json', 'w'), indent=1)
print(json.dumps(res, indent=1))
