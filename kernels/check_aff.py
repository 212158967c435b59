"""GPU check of the AFF encoder (issue 5).

1. Triton vs torch cluster attention inside `aff_base`, bf16 autocast: every stage's blocks run on the same
   captured stage inputs (tokens, clusters, relative-position bias) with `impl='torch'` and `impl='triton'`;
   outputs and gradients (tokens, bias, block parameters) compared by ||a-b||/||b||. Also the whole encoder:
   stage-1 outputs and the overlap of the kept-token sets (bf16 noise can swap near-tied scores).
2. Full `aff_base` forward+backward, bf16 autocast, 50 % Perlin masking, at 512², 1024², 2048²: median step
   time (CUDA events), peak memory, and the share of clustering + merging (synchronised timing run).

Run from the repository root:  PYTHONPATH=.:$PYTHONPATH python kernels/check_aff.py [--out DIR]
"""
import argparse, json, math, statistics, time
import torch
import affmae.aff as A
from affmae.registry import create_model
from affmae.masking import perlin_mask

dev = 'cuda'
bf16 = dict(device_type='cuda', dtype=torch.bfloat16)


def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def batch(B, size, seed=0, ratio=.5):
    g = torch.Generator(device=dev).manual_seed(seed)
    img = torch.rand(B, 1, size, size, device=dev, generator=g)
    return img, perlin_mask(B, size // 8, ratio, generator=g, device=dev)


def set_impl(enc, impl):
    for blocks in enc.stages:
        for blk in blocks: blk.attn.impl = impl
    for merge in enc.merges: merge.impl = impl


def check_triton(enc):
    "Per-stage block outputs and gradients, Triton vs torch, on identical inputs (bf16 autocast and fp32)."
    img, mask = batch(2, 512, seed=1)
    caps = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, a: caps.append([t.detach() for t in a]))
             for blocks in enc.stages]
    set_impl(enc, 'torch')
    with torch.no_grad(), torch.autocast(**bf16): enc(img, mask)
    for h in hooks: h.remove()
    rows = []
    for s, (x0, nbhd, bias0) in enumerate(caps):
        for amp in (True, False):
            res, g = {}, torch.randn(x0.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(s))
            for key, impl in (('torch', 'torch'), ('triton', 'torch' if dev == 'cpu' else 'triton')):
                set_impl(enc, impl)
                enc.zero_grad(set_to_none=True)
                x, b = x0.float().clone().requires_grad_(), bias0.float().clone().requires_grad_()
                with torch.autocast(**bf16, enabled=amp):
                    y = x
                    for blk in enc.stages[s]: y = blk(y, nbhd, b)
                (y.float() * g).sum().backward()
                pg = torch.cat([p.grad.flatten() for p in enc.stages[s].parameters()])
                res[key] = (y.detach().float(), x.grad, b.grad, pg)
            e = [rel(a, b) for a, b in zip(res['triton'], res['torch'])]
            rows.append(dict(stage=s + 1, amp='bf16' if amp else 'fp32', tokens=tuple(x0.shape[:2]), out=e[0], dx=e[1],
                             dbias=e[2], dparams=e[3]))
    print(f"{'stage':>5} {'prec':>5} {'tokens':>12} {'out':>9} {'d tokens':>9} {'d bias':>9} {'d params':>9}")
    for r in rows: print(f"{r['stage']:>5} {r['amp']:>5} {str(r['tokens']):>12} {r['out']:9.2e} {r['dx']:9.2e} "
                         f"{r['dbias']:9.2e} {r['dparams']:9.2e}")
    # whole encoder, bf16: stage 1 is comparable directly; later stages may keep a few different tokens
    outs = {}
    for key, impl in (('torch', 'torch'), ('triton', 'torch' if dev == 'cpu' else 'triton')):
        set_impl(enc, impl)
        with torch.no_grad(), torch.autocast(**bf16): outs[key] = enc(img, mask)
    enc_rows = []
    for s, (a, b) in enumerate(zip(outs['triton'], outs['torch'])):
        same = torch.isclose(a.pos, b.pos, atol=1e-2).all(-1) & a.valid & b.valid
        enc_rows.append(dict(stage=s + 1, same_tokens=same.sum().item() / b.valid.sum().item(),
                             rel_err_same=rel(a.x[same], b.x[same])))
    print('whole encoder, bf16 (triton vs torch):',
          [f"stage {r['stage']}: {100*r['same_tokens']:.1f}% same tokens, rel err {r['rel_err_same']:.2e}"
           for r in enc_rows])
    return rows, enc_rows


def time_step(enc, B, size, iters=10, impl='auto'):
    set_impl(enc, impl)
    img, mask = batch(B, size, seed=2)
    def step():
        with torch.autocast(**bf16):
            outs = enc(img, mask)
            loss = sum(o.x.float().square().mean() for o in outs)
        loss.backward()
        enc.zero_grad(set_to_none=True)
    for _ in range(3): step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); step(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    peak = torch.cuda.max_memory_allocated() / 2**30
    # synchronised breakdown: clustering (cluster_tokens) and merging forward
    spent = {'cluster': 0., 'merge_fwd': 0.}
    orig = A.cluster_tokens
    def timed_cluster(*a, **k):
        torch.cuda.synchronize(); t = time.perf_counter(); r = orig(*a, **k); torch.cuda.synchronize()
        spent['cluster'] += time.perf_counter() - t; return r
    t0 = {}
    def pre(m, a): torch.cuda.synchronize(); t0[m] = time.perf_counter()
    def post(m, a, r): torch.cuda.synchronize(); spent['merge_fwd'] += time.perf_counter() - t0[m]
    hs = [h for m in enc.merges for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    A.cluster_tokens = timed_cluster
    n = 3
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): step()
    torch.cuda.synchronize(); total = (time.perf_counter() - t) / n
    A.cluster_tokens = orig
    for h in hs: h.remove()
    return dict(size=size, batch=B, impl=impl, tokens=int((~mask).sum() // B), ms=statistics.median(ts),
                img_s=B * 1e3 / statistics.median(ts), peak_gib=peak, cluster_pct=100 * spent['cluster'] / n / total,
                merge_fwd_pct=100 * spent['merge_fwd'] / n / total)


def time_knn(B=2, size=2048):
    "Stage-1 neighbourhoods of a half-masked image: pruned `cluster_tokens` vs brute-force `knn` (same ids)."
    from affmae.clustering import cluster_tokens, knn
    from affmae.aff import visible_ids, patch_positions
    _, mask = batch(B, size, seed=3)
    ids, valid = visible_ids(mask)
    pos = patch_positions(ids, size // 8, 8)
    def med(f, n=5):
        f(); torch.cuda.synchronize(); ts = []
        for _ in range(n):
            t = time.perf_counter(); r = f(); torch.cuda.synchronize(); ts.append(1e3 * (time.perf_counter() - t))
        return statistics.median(ts), r
    tc, cl = med(lambda: cluster_tokens(pos, valid))
    tk, ref = med(lambda: knn(cl.centres, cl.pos, 64, cl.valid))
    same = torch.equal(ref.masked_fill(~cl.valid.view(B, -1, 8).any(-1)[..., None], -1), cl.nbhd)
    r = dict(size=size, batch=B, tokens=int(valid.sum()) // B, cluster_tokens_ms=tc, brute_knn_ms=tk, identical=same)
    print(r, flush=True); return r


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=None)
    ap.add_argument('--sizes', default='512:32,1024:8,2048:2')
    ap.add_argument('--arch', default='aff_base')
    ap.add_argument('--cpu', action='store_true', help='smoke-test the script on the CPU (torch path only)')
    args = ap.parse_args()
    if args.cpu:
        dev, bf16 = 'cpu', dict(device_type='cpu', dtype=torch.bfloat16)
        torch.cuda.synchronize = lambda: None
        class _Ev:
            def __init__(self, **k): pass
            def record(self): self.t = time.perf_counter()
            def elapsed_time(self, o): return 1e3 * (o.t - self.t)
        (torch.cuda.Event, torch.cuda.reset_peak_memory_stats,
         torch.cuda.max_memory_allocated) = _Ev, lambda: None, lambda: 0
        torch.cuda.get_device_name = lambda: 'cpu'
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), 'torch', torch.__version__)
    enc = create_model(args.arch).to(dev)
    print(f"{args.arch}: {sum(p.numel() for p in enc.parameters())/1e6:.2f} M parameters")
    import inspect, affmae.cluster_attention as CA
    has_triton = 'triton' in inspect.getsource(CA).replace("'triton'", '').replace('"triton"', '').replace('impl', '')
    has_triton = has_triton and not args.cpu
    rows, enc_rows = [], []
    if has_triton:
        t = time.perf_counter()
        rows, enc_rows = check_triton(enc)
        print(f"(check took {time.perf_counter() - t:.0f} s)")
    else: print('affmae.cluster_attention has no Triton kernel yet: timing the torch path only')
    knn_rows = [] if args.cpu else [time_knn(2, 2048)]
    timings = []
    for sb in args.sizes.split(','):
        size, B = map(int, sb.split(':'))
        for impl in ('torch',) if not has_triton else ('triton', 'torch') if size == 512 else ('triton',):
            try: r = time_step(enc.train(), B, size, impl=impl)
            except torch.OutOfMemoryError as e: r = dict(size=size, batch=B, impl=impl, error='OOM')
            torch.cuda.empty_cache()
            timings.append(r); print(r, flush=True)
    if not args.cpu:                                   # where the time goes: one profiled 512² step
        set_impl(enc, 'auto'); img, mask = batch(32, 512, seed=4)
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.autocast(**bf16): loss = sum(o.x.float().square().mean() for o in enc(img, mask))
            loss.backward(); torch.cuda.synchronize()
        enc.zero_grad(set_to_none=True)
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=14, max_name_column_width=60))
    print('\n| image | batch | visible tokens/img | attention | fwd+bwd step | img/s | peak memory | clustering | '
          'merging fwd |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in timings:
        if 'error' in r: print(f"| {r['size']}² | {r['batch']} | | {r['impl']} | {r['error']} | | | | |"); continue
        print(f"| {r['size']}² | {r['batch']} | {r['tokens']} | {r['impl']} | {r['ms']:.1f} ms | {r['img_s']:.1f} | "
              f"{r['peak_gib']:.2f} GiB | {r['cluster_pct']:.1f} % | {r['merge_fwd_pct']:.1f} % |")
    if args.out: json.dump(dict(blocks=rows, encoder=enc_rows, knn=knn_rows, timings=timings),
                           open(f"{args.out}/check_aff.json", 'w'), indent=1)
