"""GPU check of affmae.neighbour_sum's Triton kernels at the three merges of affmae_base (512², batch 32).

Per merge shape (K kept tokens of C channels, N = 2K, M = 64 neighbours, H = 16 heads, random -1 holes) and per
feature dtype (bf16, fp32): the Triton output and gradients (w, x) against the float64 reference (max abs error
and ||a-b||/||b||); the median time of the forward and of forward+backward, and the peak memory of forward+backward,
for the Triton path, the reference (`neighbour_sum_ref`, fp32 inside) and the einsum the merge used before
(`w.to(x.dtype)`, gather, einsum in x's dtype); a CUDA-graph capture of forward+backward replayed against eager.
Exit code 1 on an error over tolerance.
Usage: PYTHONPATH=. python kernels/check_neighbour_sum.py [--out JSON] [--tiny]
(--tiny: small shapes, a CPU smoke run in seconds; without a GPU it sets TRITON_INTERPRET=1)."""
import argparse, datetime, json, os, statistics, sys, time
import torch

SHAPES = [dict(B=32, K=1024, C=128), dict(B=32, K=512, C=256), dict(B=32, K=256, C=512)]
TINY = [dict(B=2, K=8, C=40)]
M, H = 64, 16
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}   # ||a-b||/||b|| of the output and each gradient


def make(B, K, C, dtype, dev, seed=0):
    "Inputs like a merge's: softmax weights over the real neighbours (zero on holes), N = 2K rows, 20 % holes."
    g = torch.Generator(device=dev).manual_seed(seed)
    N = 2 * K
    nb = torch.randint(0, N, (B, K, M), device=dev, generator=g)
    nb[torch.rand(B, K, M, device=dev, generator=g) < .2] = -1
    nb[:, 0] = -1                                                        # tokens with no neighbour at all
    ok = (nb >= 0)[..., None]
    w = torch.randn(B, K, M, H, device=dev, generator=g).masked_fill(~ok, -1e9).softmax(2) * ok
    x = torch.randn(B, N, C, device=dev, generator=g).to(dtype)
    return w, x, nb


def rel(a, b): return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def errors(ns, w, x, nb):
    "Max abs and relative errors of the Triton output and gradients against float64."
    ws, xs = w.clone().requires_grad_(), x.clone().requires_grad_()
    wr, xr = w.double().requires_grad_(), x.double().requires_grad_()
    out = ns.neighbour_sum(ws, xs, nb, impl='triton', check_idx=False)
    ref = ns.neighbour_sum_ref(wr, xr, nb, check_idx=False)
    g = torch.Generator(x.device).manual_seed(1)
    go = torch.randn(ref.shape, device=x.device, dtype=torch.float64, generator=g)
    out.backward(go.to(out.dtype))
    ref.backward(go)
    pairs = dict(out=(out, ref), dw=(ws.grad, wr.grad), dx=(xs.grad, xr.grad))
    res = {k: rel(a, b) for k, (a, b) in pairs.items()}
    res.update({f'{k}_max_abs': (a.double() - b).abs().max().item() for k, (a, b) in pairs.items()})
    return res


def sync(dev):
    if dev == 'cuda': torch.cuda.synchronize()


def timed(fn, dev, n=20, warm=3):
    "Median wall time (ms) of `fn` over `n` calls after `warm`, synchronised around each."
    for _ in range(warm): fn()
    ts = []
    for _ in range(n):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def peak_mb(fn, dev):
    "Peak memory (MB) allocated by `fn` above what was allocated before it (CUDA only)."
    if dev != 'cuda': return None
    fn()
    sync(dev)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def paths(ns, gather_rows):
    "The implementations compared: name -> f(w, x, nb)."
    einsum = lambda w, x, nb: torch.einsum('bkmh,bkmc->bkhc', w.to(x.dtype), gather_rows(x, nb, zero=False))
    return dict(triton=lambda w, x, nb: ns.neighbour_sum(w, x, nb, impl='triton', check_idx=False),
                ref=lambda w, x, nb: ns.neighbour_sum_ref(w, x, nb, check_idx=False), einsum=einsum)


def timings(f, w, x, nb, dev, n, warm):
    "`(forward ms, forward+backward ms, peak MB)` of `f`."
    ws, xs = w.clone().requires_grad_(), x.clone().requires_grad_()
    go = torch.randn(f(w, x, nb).shape, device=x.device).to(x.dtype)
    fwd = lambda: f(ws, xs, nb)
    step = lambda: torch.autograd.grad(f(ws, xs, nb), (ws, xs), go)
    with torch.no_grad(): ms_fwd = timed(fwd, dev, n, warm)
    return ms_fwd, timed(step, dev, n, warm), peak_mb(step, dev)


def check_capture(ns, w, x, nb):
    "Forward+backward captured in a CUDA graph and replayed on new inputs: worst ||graph - eager|| / ||eager||."
    ws, xs = w.clone().requires_grad_(), x.clone().requires_grad_()
    go = torch.randn(w.shape[0], w.shape[1], H, x.shape[2], device='cuda').to(x.dtype)
    step = lambda: (lambda o: (o,) + torch.autograd.grad(o, (ws, xs), go))(
        ns.neighbour_sum(ws, xs, nb, impl='triton', check_idx=False))
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)   # the warm-up's leaves, on purpose
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s): step()                                    # warm-up (autotuning) off the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph): static = step()
    with torch.no_grad(): ws.copy_(ws.flip(1)); xs.copy_(xs.flip(1))    # new inputs, same buffers
    graph.replay()
    eager = step()
    return max(rel(a, b.double()) for a, b in zip(static, eager))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', help='write the results to this JSON file')
    p.add_argument('--tiny', action='store_true', help='small shapes: a smoke run in seconds, on the CPU too')
    a = p.parse_args()
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev == 'cpu':
        if not a.tiny: sys.exit('the full shapes need a GPU; --tiny runs on the CPU')
        os.environ.setdefault('TRITON_INTERPRET', '1')                  # before the kernels are defined
    import affmae.neighbour_sum as ns
    from affmae.clustering import gather_rows
    if ns.triton is None: sys.exit('Triton is not installed')
    t0, rows, failed = time.time(), [], False
    n, warm = (1, 1) if a.tiny else (20, 3)
    for shape in (TINY if a.tiny else SHAPES):
        for dtype in (torch.bfloat16, torch.float32):
            w, x, nb = make(**shape, dtype=dtype, dev=dev)
            err = errors(ns, w, x, nb)
            ok = all(err[k] < TOL[dtype] for k in ('out', 'dw', 'dx'))
            failed |= not ok
            ms, ms_step, mb = {}, {}, {}
            for name, f in paths(ns, gather_rows).items():
                ms[name], ms_step[name], mb[name] = timings(f, w, x, nb, dev, n, warm)
            rows.append(dict(**shape, N=2 * shape['K'], M=M, H=H, dtype=str(dtype)[6:], errors=err, ok=ok,
                             ms_fwd=ms, ms_fwd_bwd=ms_step, peak_mb=mb))
            del w, x, nb
    capture = check_capture(ns, *make(**(TINY if a.tiny else SHAPES)[0], dtype=torch.bfloat16, dev=dev)) \
        if dev == 'cuda' else None
    failed |= capture is not None and capture > TOL[torch.bfloat16]   # dx's atomics add in a varying order
    res = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (Triton interpreter)',
               torch=torch.__version__, triton=ns.triton.__version__,
               date=datetime.datetime.now().isoformat(timespec='seconds'), command=' '.join(sys.argv),
               timing=f'median of {n} calls after {warm} warm-ups, synchronised around each', cases=rows,
               configs={k.fn.__name__: {str(key): str(c) for key, c in k.cache.items()}
                        for k in (ns._nsum_fwd_kernel, ns._nsum_bwd_kernel)},
               capture_rel_error=capture, seconds=round(time.time() - t0, 1))
    print(f"{res['device']}: torch {res['torch']}, triton {res['triton']}")
    print(f"{'K':>5} {'C':>4} {'dtype':>8} {'err out':>8} {'err dw':>8} {'err dx':>8} | {'fwd ms: triton':>14} "
          f"{'einsum':>7} {'ratio':>6} | {'fwd+bwd ms: triton':>18} {'ref':>7} {'einsum':>7} {'ratio':>6} | "
          f"{'peak MB: triton':>15} {'ref':>7} {'einsum':>7}")
    for r in rows:
        e, f, s, m = r['errors'], r['ms_fwd'], r['ms_fwd_bwd'], r['peak_mb']
        mem = (f"{m['triton']:15.0f} {m['ref']:7.0f} {m['einsum']:7.0f}" if m['triton'] is not None
               else f"{'-':>15} {'-':>7} {'-':>7}")
        print(f"{r['K']:>5} {r['C']:>4} {r['dtype']:>8} {e['out']:8.1e} {e['dw']:8.1e} {e['dx']:8.1e} | "
              f"{f['triton']:14.3f} {f['einsum']:7.3f} {f['einsum'] / f['triton']:5.1f}x | {s['triton']:18.3f} "
              f"{s['ref']:7.3f} {s['einsum']:7.3f} {s['einsum'] / s['triton']:5.1f}x | {mem}"
              + ('' if r['ok'] else '  FAIL'))
    if capture is not None: print(f"CUDA graph replay vs eager: relative error {capture:.1e}")
    print(f"{res['seconds']} s")
    if a.out:
        with open(a.out, 'w') as fh: json.dump(res, fh, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
