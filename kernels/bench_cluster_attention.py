"""Benchmark of affmae.cluster_attention on the GPU: median forward and forward+backward time
(triton.testing.do_bench) of the Triton kernels vs the PyTorch reference vs dense SDPA over the same tokens, at the
AFF-Base stage shapes of 512², 1024², 2048² images (patch 8, 50 % mask, ds 0.4 per stage, cluster 8, neighbourhood 64,
head dim 32, heads 4/8/16/24), bf16; extra memory and achieved GB/s, TFLOP/s against the card's measured peaks.
Neighbourhoods are realistic: random visible points ordered along a Morton curve, clusters of 8 consecutive points,
each cluster's 64 nearest points. Usage: PYTHONPATH=. python kernels/bench_cluster_attention.py"""
import datetime, math, sys, torch, triton
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph
from affmae.cluster_attention import cluster_attention, cluster_attention_ref

dev, dt = 'cuda', torch.bfloat16

def morton(x, y, bits=16):
    code = torch.zeros_like(x)
    for i in range(bits): code |= ((x >> i) & 1) << (2 * i) | ((y >> i) & 1) << (2 * i + 1)
    return code

def neighbourhoods(B, N, side, Q=8, M=64):
    "nbhd_idx (B, N//Q, M): the M nearest tokens of each cluster's centre, tokens in Morton order."
    out = []
    for _ in range(B):
        cells = torch.randperm(side * side, device=dev)[:N]
        x, y = cells % side, cells // side
        o = torch.argsort(morton(x, y)); p = torch.stack([x[o], y[o]], 1).float()
        cen = p.view(N // Q, Q, 2).mean(1)
        idx = torch.cat([torch.cdist(c, p).topk(M, largest=False).indices for c in cen.split(1024)])
        out.append(idx)
    return torch.stack(out).int()

def peaks():
    x = torch.empty(2**30, dtype=torch.uint8, device=dev); y = torch.empty_like(x)
    bw = 2 * x.numel() / do_bench(lambda: y.copy_(x), return_mode='median') / 1e6      # GB/s, read + write
    a = torch.randn(8192, 8192, device=dev, dtype=dt); b = torch.randn_like(a)
    fl = 2 * 8192**3 / do_bench(lambda: a @ b, return_mode='median') / 1e9             # TFLOP/s
    return bw, fl

def mem(fn):
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    fn(); torch.cuda.synchronize(); return (torch.cuda.max_memory_allocated() - base) / 2**20

def bench_shape(B, N, H, D=32, Q=8, M=64, side=None, with_bias=False, ref=True):
    idx = neighbourhoods(B, N, side)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    bias = torch.randn(B, H, N, M, device=dev, dtype=dt, requires_grad=True) if with_bias else None
    do = torch.randn(B, H, N, D, device=dev, dtype=dt)
    res = {}
    impls = [('triton', lambda: cluster_attention(q, k, v, idx, bias, impl='triton'))]
    if ref: impls.append(('torch ref', lambda: cluster_attention_ref(q, k, v, idx, bias)))
    impls.append(('dense SDPA', lambda: F.scaled_dot_product_attention(q, k, v)))
    for name, f in impls:
        def fb():
            o = f(); o.backward(do)
            for t in (q, k, v, bias):
                if t is not None: t.grad = None
        eager = do_bench(fb, return_mode='median')            # also autotunes before any graph capture
        try: fwd, fwdbwd = (do_bench_cudagraph(g, return_mode='median') for g in (f, fb))
        except Exception as e: print('graph capture failed:', name, repr(e)[:200]); fwd, fwdbwd = float('nan'), float('nan')
        res[name] = (fwd, fwdbwd, eager, mem(fb))
    return res, idx

def main():
    bw, fl = peaks()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; measured peaks: copy {bw:,.0f} GB/s, bf16 matmul {fl:,.0f} TFLOP/s")
    rows = []
    # (image, stage, B, N visible tokens rounded to the cluster size, heads, grid side in patches)
    for img, B in ((512, 32), (1024, 8), (2048, 2)):
        side, n = img // 8, (img // 8)**2 // 2
        for st, H in enumerate((4, 8, 16, 24)):
            N = -(-n // 8) * 8
            if st < 2 or img == 1024:
                rows.append((img, st + 1, B, N, H, side, False))
            n = round(n * 0.4)
    rows.insert(2, (1024, 1, 8, 8192, 4, 128, True))
    print('\n| image | stage | B | N | H | bias | impl | fwd ms | fwd+bwd ms | eager fwd+bwd ms | extra MiB (fwd+bwd) | fwd GB/s | fwd+bwd TFLOP/s |')
    print('|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|')
    for img, st, B, N, H, side, wb in rows:
        D, M = 32, 64
        res, idx = bench_shape(B, N, H, side=side, with_bias=wb, ref=N * B <= 8 * 8192)
        fbytes = 4 * B * H * N * D * 2 + idx.numel() * 4 + B * H * N * 4 + (B * H * N * M * 2 if wb else 0)
        flops = 2 * B * H * N * M * D
        for name, (f, fb, ea, m) in res.items():
            fl_ = 7 * flops if name != 'dense SDPA' else 7 * 2 * B * H * N * N * D   # fwd 2 dots + bwd 5 dots
            gbs = fbytes / f / 1e6 if name == 'triton' else float('nan')
            print(f"| {img}² | {st} | {B} | {N} | {H} | {'yes' if wb else 'no'} | {name} | {f:.3f} | {fb:.3f} | {ea:.3f} | {m:,.0f} | {gbs:,.0f} | {fl_ / fb / 1e9:.1f} |", flush=True)
    print(f"\nfwd, fwd+bwd: GPU time, median of CUDA-graph replays (no launch overhead); eager: median of plain calls (launches, argument checks incl. the index-range sync).")
    print(f"peaks: {bw:,.0f} GB/s copy, {fl:,.0f} TFLOP/s bf16; GB/s counts q,k,v,out,idx,lse(,bias) once; TFLOP/s counts useful FLOPs (14·B·H·N·M·D for cluster attention, 14·B·H·N²·D for SDPA).")

if __name__ == '__main__': main()
