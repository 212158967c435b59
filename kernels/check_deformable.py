"""GPU check and cost of the published (deformable) decoder against ours (point), at the published 512² crop.

1. `idw_sample` on CUDA equals the CPU float64 result (output; gradients of values, points, point weights), for the
   brute-force and the cluster-pruned nearest-token search.
2. `affmae_base` with `PAPER_DECODER` against `affmae_base` (point decoder, ds 0.5/0.5/0.5/1): eager training steps
   with fp16 autocast and a GradScaler (the published precision), AdamW with the published betas; step time (median
   after warm-up) and peak memory per batch size.

    python kernels/check_deformable.py --out $OUT/check_deformable.json   # on the GPU machine, a few minutes
"""
import argparse, json, statistics, time
import torch
from affmae.aff import create_model
from affmae.clustering import cluster_tokens, gather_rows
from affmae.mae import PAPER_DECODER, idw_sample
from affmae.learner import RECIPES

p = argparse.ArgumentParser()
p.add_argument('--size', type=int, default=512)
p.add_argument('--bs', default='8,26,52')
p.add_argument('--steps', type=int, default=8)
p.add_argument('--out', default=None)
a = p.parse_args()
dev = torch.device('cuda')
res = dict(size=a.size, idw={}, steps={})

# 1. idw_sample, CUDA vs CPU float64
torch.manual_seed(0)
B, Nk, N, H, P, D = 4, 4096, 512, 6, 4, 64
kpos, kvalid = torch.rand(B, Nk, 2) * 64, torch.rand(B, Nk) < .9
v = torch.randn(B, Nk, H, D, dtype=torch.float64)
loc = torch.rand(B, N, H, P, 2, dtype=torch.float64) * 70 - 3
attn = torch.rand(B, N, H, P, dtype=torch.float64).softmax(-1)
cl = cluster_tokens(kpos, kvalid, 8, 8)
for name, keys in (('knn', None), ('cluster_knn', 'clusters')):
    outs = []
    for d, dt in (('cpu', torch.float64), ('cuda', torch.float32)):
        leaf = lambda t: t.detach().to(d, dt).clone().requires_grad_()
        vv, ll, aa = leaf(v if keys is None else gather_rows(v, cl.order)), leaf(loc), leaf(attn)
        kp, kv = (kpos, kvalid) if keys is None else (cl.pos, cl.valid)
        k = None if keys is None else (cl.centres.to(d), 8)
        o = idw_sample(vv, kp.to(d), kv.to(d), ll, aa, keys=k)
        o.square().sum().backward()
        outs.append([t.detach().double().cpu() for t in (o, vv.grad, ll.grad, aa.grad)])
    res['idw'][name] = [((c - g).norm() / g.norm()).item() for g, c in zip(*outs)]
    print(name, 'relative error (out, dv, dloc, dattn):', res['idw'][name])

# 2. step time and memory
def bench(arch_kw, bs):
    torch.manual_seed(0)
    m = create_model('affmae_base', **arch_kw).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=2.5e-4, betas=RECIPES['paper']['betas'], weight_decay=.05, fused=True)
    scaler = torch.amp.GradScaler()
    img = torch.randn(bs, 1, a.size, a.size, device=dev)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(a.steps):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.autocast('cuda', torch.float16): out = m(img)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out['loss']).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(m.parameters(), RECIPES['paper']['clip'])
        scaler.step(opt); scaler.update()
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    return dict(step_ms=1e3 * statistics.median(times[2:]), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                loss=out['loss'].item(), losses=[l.item() for l in out['losses']])

for bs in map(int, a.bs.split(',')):
    for name, kw in (('point', {}), ('deformable', PAPER_DECODER)):
        try: r = bench(kw, bs)
        except torch.OutOfMemoryError: r = dict(oom=True)
        res['steps'][f'{name}_bs{bs}'] = r
        print(name, bs, r)
        torch.cuda.empty_cache()

if a.out: json.dump(res, open(a.out, 'w'), indent=1)
