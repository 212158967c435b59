"""GPU correctness check of affmae.cluster_attention's Triton kernels against the float64 reference: forward and the
gradients of q, k, v, bias, the blank key/value and the locality coefficients on >= 200 random ragged cases at real
sizes, in bf16, fp16 and fp32 (padding, duplicate indices, fully padded clusters, huge logits, strided q/k/v, with and
without a blank token, with and without the in-kernel locality bias from positions; the fused (B, N, 3, H, D)
projection through `cluster_attention_packed`).
Exit code 1 on any failure.
Usage: AFFMAE_AUTOTUNE=0 PYTHONPATH=. python kernels/check_cluster_attention.py [--n 240] [--start 0]
(compiling the many kernel variants dominates; run seed ranges in parallel processes to use the CPU cores)."""
import argparse, sys, time, torch
from affmae.cluster_attention import cluster_attention, cluster_attention_packed, cluster_attention_ref

TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}

def rel(a, b): return ((a.double() - b).norm() / b.norm().clamp_min(1e-2 * b.numel()**.5)).item()

def dense_d2(qpos, kpos, idx):
    "Squared distances `(B, 1, N, M)` in float64 from each query to its cluster's neighbours (padding: any)."
    B, G, M = idx.shape
    kp = kpos.double()[torch.arange(B, device=idx.device)[:, None, None], idx.clamp_min(0).long()]
    return (qpos.double().view(B, G, -1, 1, 2) - kp[:, :, None]).square().sum(-1).reshape(B, 1, -1, M)

def case(g, dev):
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    dtype = [torch.bfloat16, torch.float16, torch.float32][r(0, 2)]
    if r(0, 9) < 6: Q, M, D = 8, r(33, 64), 32                     # AFF-like: cluster 8, neighbourhood <= 64, D 32
    else: Q, M, D = [1, 5, 16, 40][r(0, 3)], [r(1, 16), r(65, 128), r(129, 200)][r(0, 2)], [16, 24, 64, 128][r(0, 3)]
    B, H, G = r(1, 3), r(1, 4), r(1, 2048 // Q)
    strided = r(0, 3) == 0                                           # q, k, v as views of one fused qkv tensor
    N = G * Q
    Nk = N if strided else r(1, 3000)
    idx = torch.randint(0, Nk, (B, G, M), generator=g)
    idx[torch.rand(B, G, M, generator=g) < torch.rand((), generator=g) * 0.5] = -1
    idx[torch.rand(B, G, M, generator=g) < 0.1] = r(0, Nk - 1)
    idx[:, torch.rand(G, generator=g) < 0.05] = -1
    huge = r(0, 7) == 0
    if strided: q, k, v = torch.randn(B, N, 3, H, D, generator=g).permute(2, 0, 3, 1, 4)
    else: q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (N, Nk, Nk))
    bias = torch.randn(B, H, N, M, generator=g) if r(0, 1) else None
    blank = [torch.randn(H, D, generator=g) for _ in range(2)] if r(0, 1) else None
    loc = None
    if r(0, 1):   # the decoder's locality: coef_h * |qpos - kpos|^2, positions in patch units
        reach = 500. if huge else 60.
        loc = [torch.rand(B, N, 2, generator=g) * reach, torch.rand(B, Nk, 2, generator=g) * reach,
               -torch.rand(H, generator=g) * 0.3]
    if huge:
        q, k = q * 30, k * 30
        if bias is not None: bias = bias * 3e3
        if blank is not None: blank[0] = blank[0] * 30
    if r(0, 1): idx = idx.int()
    cvt = lambda t: t.to(dev, dtype)
    blank = [cvt(t) for t in blank] if blank is not None else None
    loc = [t.to(dev) for t in loc] if loc is not None else None      # positions and coefficients stay fp32
    return dtype, (cvt(q), cvt(k), cvt(v)), idx.to(dev), (cvt(bias) if bias is not None else None), blank, loc, huge, \
        strided

def run(seed, dev):
    g = torch.Generator().manual_seed(seed)
    dtype, (q, k, v), idx, bias, blank, loc, huge, strided = case(g, dev)
    ins = [q, k, v] + ([bias] if bias is not None else []) + (blank or []) + ([loc[2]] if loc else [])
    xs = [t.detach().clone().requires_grad_() for t in ins]
    packed = None
    if strided:   # the fused projection (B, N, 3, H, D) through cluster_attention_packed; its gradient unpacked below
        packed = torch.stack(ins[:3], 2).permute(0, 3, 2, 1, 4).contiguous().requires_grad_()
        xs[:3] = [t.transpose(1, 2) for t in packed.unbind(2)]
    rs = [t.detach().double().requires_grad_() for t in ins]
    nb = 3 + (bias is not None)   # where the blank's pair starts among the inputs
    opt = lambda ts, pos: dict(bias=ts[3] if bias is not None else None, blank=tuple(ts[nb:nb + 2]) if blank else None,
                               locality=(*pos, ts[-1]) if pos is not None else None)
    kw = opt(xs, loc[:2] if loc else None)
    out = cluster_attention_packed(None, packed, idx, impl='triton', **kw) if strided else \
        cluster_attention(*xs[:3], idx, impl='triton', **kw)
    ro = opt(rs, None)
    if loc:   # the reference's locality as a dense float64 bias, whose gradient dS scales the coefficient's error
        d2 = dense_d2(*loc[:2], idx)
        dense = rs[-1].view(1, -1, 1, 1) * d2
        ro['bias'] = dense if bias is None else ro['bias'] + dense
    ref = cluster_attention_ref(*rs[:3], idx, **ro)
    go = torch.randn(ref.shape, generator=torch.Generator(dev).manual_seed(seed), device=dev, dtype=torch.float64)
    grads = torch.autograd.grad(out, [packed] + xs[3:] if strided else xs, go.to(dtype))
    if strided: grads = (*(t.transpose(1, 2) for t in grads[0].unbind(2)), *grads[1:])
    rgrads = torch.autograd.grad(ref, rs + ([dense] if loc else []), go)
    tf, tg = TOL[dtype]
    if huge: tf, tg = 4 * tf, 4 * tg
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, rgrads)]
    if loc:   # the coefficient's gradient sums dS·d², which cancels: error against Σ|dS|·d², as the CPU tests do
        ds = rgrads[-1]
        scale = (ds.abs() * d2).sum() + 1e-2 * d2.square().mean().sqrt()
        errs[len(grads)] = ((grads[-1].double() - rgrads[len(grads) - 1]).abs().sum() / scale).item()
    finite = torch.isfinite(out).all().item() and all(torch.isfinite(x).all().item() for x in grads)
    ok = finite and errs[0] < tf and all(e < tg for e in errs[1:])
    desc = (f"B={q.shape[0]} H={q.shape[1]} N={q.shape[2]} G={idx.shape[1]} M={idx.shape[2]} Nk={k.shape[2]} "
            f"D={q.shape[3]} {str(dtype)[6:]} bias={bias is not None} blank={blank is not None} huge={huge} "
            f"locality={loc is not None} strided={strided} idx={str(idx.dtype)[6:]}")
    return ok, errs, desc, dtype

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=240)
    p.add_argument('--start', type=int, default=0)
    a = p.parse_args()
    dev, t0, worst, fails = 'cuda', time.time(), {}, 0
    for seed in range(a.start, a.start + a.n):
        ok, errs, desc, dtype = run(seed, dev)
        w = worst.setdefault(dtype, [0., 0., 0])
        w[:] = max(w[0], errs[0]), max(w[1], max(errs[1:])), w[2] + 1
        if seed % 40 == 39: print(f"{seed + 1} cases, {fails} failures, {time.time() - t0:.0f} s", flush=True)
        if not ok:
            fails += 1
            print(f"FAIL seed {seed}: {desc} errors (out, dq, dk, dv[, dbias][, dk_blank, dv_blank][, dcoef]) = "
                  f"{[f'{e:.2e}' for e in errs]}")
    print(f"\ncluster attention check on {torch.cuda.get_device_name()}: {a.n} random cases, {fails} failures, "
          f"{time.time() - t0:.0f} s")
    print('| dtype | cases | worst rel. error out | worst rel. error grads |\n|---|---:|---:|---:|')
    for dt, (eo, eg, n) in worst.items(): print(f"| {str(dt)[6:]} | {n} | {eo:.2e} | {eg:.2e} |")
    sys.exit(1 if fails else 0)

if __name__ == '__main__': main()
