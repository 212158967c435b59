"""GPU check of the captured segmentation step and of capture's failure paths (`affmae.graphs.StepGraph`).

1. Segmentation (`loss_func` given, class-weighted unless `--weights ''`): for each model, two identical copies train
   on the same batches, one with eager steps, one through StepGraph (warm-up, capture, replays); losses and weights
   must agree up to the eager-vs-eager noise floor, with one capture. Prints both step times.
2. A loader's pin-memory thread allocating pinned memory during a capture must not break it (thread-local capture).
3. A step that cannot be captured (it reads a GPU value on the host) falls back to eager steps that still draw random
   numbers (dropout) without error: the CUDA generator is not left in capture mode.

    python kernels/check_capture_seg.py --out $OUT/check_capture_seg.json   # on the GPU machine, about a minute
"""
import argparse, copy, json, threading, time
import torch, torch.nn as nn
from affmae.registry import create_model
from affmae.graphs import StepGraph
from affmae.seg_metrics import CEDiceLoss

p = argparse.ArgumentParser()
p.add_argument('--archs', default='affmae_base,vitmae_base,unet')
p.add_argument('--size', type=int, default=256)
p.add_argument('--bs', type=int, default=8)
p.add_argument('--steps', type=int, default=8)
p.add_argument('--weights', default='0.2,2,3,2,3', help="the loss's class weights (the published ones; '': none)")
p.add_argument('--out', default=None)
a = p.parse_args()
weights = tuple(map(float, a.weights.split(','))) if a.weights else None
dev, loss_func = torch.device('cuda'), CEDiceLoss(weight=weights)


def eager_step(m, opt, x, y):
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cuda', torch.bfloat16): loss = loss_func(m(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(m.parameters(), 1.)
    opt.step()
    return loss.detach()


def rel(ms, ref):
    d = sum((p.float() - q.float()).square().sum() for p, q in zip(ms.parameters(), ref.parameters()))
    return (d.sqrt() / sum(q.float().square().sum() for q in ref.parameters()).sqrt()).item()


def timed(f, n=10):
    f(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3


res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, size=a.size, bs=a.bs, weights=weights,
           models={})
g = torch.Generator(device=dev).manual_seed(1)
xs = [torch.randn(a.bs, 1, a.size, a.size, device=dev, generator=g) for _ in range(a.steps)]
ys = [torch.randint(0, 5, (a.bs, a.size, a.size), device=dev, generator=g) for _ in range(a.steps)]
for arch in a.archs.split(','):
    torch.manual_seed(0)
    m0 = create_model(arch, 'segmentation', n_classes=5).to(dev)
    m1, m2 = copy.deepcopy(m0), copy.deepcopy(m0)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=.05, fused=True) for m in (m0, m1, m2)]
    l0 = [eager_step(m0, opts[0], x, y) for x, y in zip(xs, ys)]
    for x, y in zip(xs, ys): eager_step(m2, opts[2], x, y)
    logs = []
    sg = StepGraph(m1, opts[1], clip=1., warmup=2, log=logs.append, loss_func=loss_func)
    l1 = [sg(x, y)['loss'].clone() for x, y in zip(xs, ys)]
    torch.cuda.synchronize()
    loss_rel = max(abs(u.item() - v.item()) / abs(u.item()) for u, v in zip(l0, l1))
    w_rel, w_noise = rel(m1, m0), rel(m2, m0)
    eager_ms, graph_ms = timed(lambda: eager_step(m2, opts[2], xs[0], ys[0])), timed(lambda: sg(xs[0], ys[0]))
    r = dict(loss_max_rel=loss_rel, weights_rel=w_rel, weights_rel_eager_twice=w_noise, captures=len(sg.graphs),
             logs=logs, eager_ms=round(eager_ms, 2), captured_ms=round(graph_ms, 2),
             ok=loss_rel < 2e-2 and w_rel < 2 * w_noise + 1e-4 and len(sg.graphs) == 1)
    res['models'][arch] = r
    print(f"{arch:>12}: loss rel {loss_rel:.2e}, weights rel {w_rel:.2e} (eager twice {w_noise:.2e}), "
          f"captures {len(sg.graphs)}, step {eager_ms:.1f} ms eager / {graph_ms:.1f} ms captured "
          f"-> {'OK' if r['ok'] else 'FAIL'} {logs if not r['ok'] else ''}", flush=True)
    del m0, m1, m2, opts, sg; torch.cuda.empty_cache()

# 2. a pin-memory thread allocating while the step is captured
net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Dropout(.1), nn.Conv2d(8, 5, 1)).to(dev)
stop, pinned = threading.Event(), [0]
def pin_loop():
    while not stop.is_set(): torch.empty(1 << 20, pin_memory=True); pinned[0] += 1
th = threading.Thread(target=pin_loop); th.start()
logs = []
sg = StepGraph(net, torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True), warmup=1, log=logs.append,
               loss_func=loss_func)
try:
    for _ in range(6): sg(xs[0], ys[0])
finally: stop.set(); th.join()
res['pin_thread'] = dict(captures=len(sg.graphs), pinned_allocations=pinned[0], logs=logs, ok=len(sg.graphs) == 1)
print(f"pin-memory thread: {pinned[0]} pinned allocations during the run, captures {len(sg.graphs)} "
      f"-> {'OK' if len(sg.graphs) == 1 else 'FAIL'} {logs}", flush=True)

# 3. an uncapturable step: eager fallback, random numbers still drawn
class Syncing(nn.Module):
    def __init__(self): super().__init__(); self.net = copy.deepcopy(net)
    def forward(self, x):
        y = self.net(x)
        return y * (1 if y.mean().item() > -1e9 else 0)           # a host read: illegal while capturing
m = Syncing().to(dev)
logs, ok, err = [], True, None
sg = StepGraph(m, torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True), warmup=1, log=logs.append,
               loss_func=loss_func)
try:
    losses = [sg(xs[0], ys[0])['loss'].item() for _ in range(5)]
    torch.rand(3, device=dev).sum().item()
except Exception as e: ok, err, losses = False, f'{type(e).__name__}: {e}'[:300], []
ok = ok and not sg.graphs and any('capture failed' in l for l in logs)
res['failed_capture'] = dict(ok=ok, logs=logs, losses=losses, error=err)
print(f"failed capture: eager losses {[round(l, 4) for l in losses]}, logs {logs}, error {err} -> "
      f"{'OK' if ok else 'FAIL'}", flush=True)
res['ok'] = all(r['ok'] for r in res['models'].values()) and res['pin_thread']['ok'] and ok
if a.out: open(a.out, 'w').write(json.dumps(res, indent=1))
