"""Where one eager training step's GPU time goes: per category, the costliest operators (forward and backward), and
the costliest kernels by name, from `torch.profiler` (affmae.measure.profile_step). Writes a JSON per arch.
Usage: PYTHONPATH=. python kernels/profile_ops.py --archs affmae_base --size 512 --bs 32 --out $OUT
       PYTHONPATH=. python kernels/profile_ops.py --archs affmae_tiny --size 64 --bs 2 --out /tmp/p   # CPU check"""
import argparse, json, time
from pathlib import Path
import torch
from affmae.registry import create_model
from affmae.measure import make_images, make_optimizer, profile_step, train_step

p = argparse.ArgumentParser()
p.add_argument('--archs', default='affmae_base')
p.add_argument('--size', type=int, default=512)
p.add_argument('--bs', type=int, default=32)
p.add_argument('--top', type=int, default=40, help='operators and kernels listed')
p.add_argument('--warmup', type=int, default=3)
p.add_argument('--out', default='runs/profile_ops')
a = p.parse_args()
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
for arch in a.archs.split(','):
    torch.manual_seed(0)
    model = create_model(arch).to(dev)
    opt, img = make_optimizer(model), make_images(a.bs, a.size, dev)
    for _ in range(a.warmup): train_step(model, opt, img)                       # compile, autotune, allocate
    prof = profile_step(model, opt, img, top=a.top)
    Act = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[Act.CUDA] if dev == 'cuda' else [Act.CPU]) as kp:
        train_step(model, opt, img)
        if dev == 'cuda': torch.cuda.synchronize()
    evts = kp.key_averages()
    t = (lambda e: e.device_time_total) if dev == 'cuda' else (lambda e: e.self_cpu_time_total)
    kernels = {e.key[:120]: dict(ms=t(e) / 1e3, calls=e.count) for e in sorted(evts, key=t, reverse=True)[:a.top]}
    res = dict(arch=arch, size=a.size, bs=a.bs, device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
               torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
               command=f"python kernels/profile_ops.py --archs {arch} --size {a.size} --bs {a.bs} --top {a.top}",
               events=sum(e.count for e in evts), profile=prof, kernels=kernels)
    (out / f'profile_ops_{arch}_{a.size}_{a.bs}.json').write_text(json.dumps(res, indent=1))
    print(f"{arch} {a.size}² b{a.bs}: busy {prof['busy_ms']:.1f} ms of {prof['wall_ms']:.1f} ms, "
          f"{res['events']} profiler events; by category {({k: round(v, 2) for k, v in prof['ms'].items()})}")
    for k, v in prof['top_ops'].items(): print(f"  {v:7.2f} ms  {k}")
    for k, v in kernels.items(): print(f"  {v['ms']:7.2f} ms {v['calls']:5d}x  {k}")
    del model, opt
