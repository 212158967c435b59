"""GPU check of affmae.layer_norm's Triton LayerNorm in the autocast case: an fp32 input, a bf16 output.

Per shape (rows, C) of the encoder: the output and gradients (x, weight, bias) of `LayerNorm` under autocast against
the float64 reference (max abs error and ||a-b||/||b||), next to those of nn.LayerNorm; then, for (a) nn.LayerNorm
under autocast followed by `.to(bfloat16)` (the copy a Linear makes of its input) and (b) `LayerNorm` under autocast:
the median time (CUDA events) of the forward and of forward+backward, eagerly and replayed from a CUDA graph, and the
peak memory of forward+backward. The replay of (b) also checks that it captures (no host sync) and that its output and
gradients equal the eager ones bit for bit. Exit code 1 on an error over tolerance or a replay that differs.
Usage: PYTHONPATH=. python kernels/check_layer_norm.py --out kernels/results [--tiny]
(--tiny: small shapes, a CPU smoke run in seconds; without a GPU it sets TRITON_INTERPRET=1)."""
import argparse, datetime, json, os, pathlib, statistics, sys, time
import torch, torch.nn as nn

SHAPES = [(65536, 128), (32768, 256), (16384, 512), (8192, 768), (65536, 384), (262144, 384)]
TINY = [(37, 130), (64, 384)]
TOL = dict(y=1e-2, dx=1e-2, dw=1e-2, db=1e-4)   # ||a-b||/||b||: y bf16; dx, dw read x̂ saved in bf16; db fp32
BF16 = torch.bfloat16


def make(R, C, dev, seed=0):
    "An fp32 input and fp32 parameters away from their initial values, and a bf16 output gradient."
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(R, C, device=dev, generator=g) * 2 + .5
    w = 1 + .1 * torch.randn(C, device=dev, generator=g)
    b = .1 * torch.randn(C, device=dev, generator=g)
    dy = torch.randn(R, C, device=dev, generator=g).to(BF16)
    return x, w, b, dy


def modules(ln_mod, C, w, b, dev):
    "name -> (module, cast to bf16 after it): nn.LayerNorm + the Linear's cast, and the Triton LayerNorm."
    ref, new = nn.LayerNorm(C, device=dev), ln_mod.LayerNorm(C, device=dev, impl='triton')
    for m in (ref, new):
        with torch.no_grad(): m.weight.copy_(w), m.bias.copy_(b)
    return {'nn+cast': (ref, True), 'triton': (new, False)}


def step(m, cast, x, dy, dev, backward=True):
    "Forward under autocast (bf16), then the gradients of x, weight, bias; returns (y, dx, dw, db) or (y,)."
    with torch.autocast(dev, dtype=BF16):
        y = m(x)
        if cast: y = y.to(BF16)
    return (y,) + (torch.autograd.grad(y, (x, m.weight, m.bias), dy) if backward else ())


def errors(ln_mod, m, cast, x, w, b, dy, dev):
    "Max abs and relative errors of y, dx, dw, db against float64."
    xs = x.clone().requires_grad_()
    ours = step(m, cast, xs, dy, dev)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    ref = ln_mod.layer_norm_ref(xr, wr, br, m.eps)
    refs = (ref,) + torch.autograd.grad(ref, (xr, wr, br), dy.double())
    names = ('y', 'dx', 'dw', 'db')
    return ({k: (a.double() - r).abs().max().item() for k, a, r in zip(names, ours, refs)},
            {k: ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item() for k, a, r in zip(names, ours, refs)})


def timed(fn, dev, n, warm):
    "Median time (ms) of `fn` over `n` calls after `warm`: CUDA events around each call, the wall clock on the CPU."
    for _ in range(warm): fn()
    ts = []
    for _ in range(n):
        if dev == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def peak_mb(fn):
    "Peak memory (MB) allocated by `fn` above what was allocated before it (CUDA only)."
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def graphed(fn):
    "`fn` captured in a CUDA graph after a warm-up on a side stream: `(replay, static outputs)`."
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s): fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph): out = fn()
    return graph, out


def check_args(doc, name):
    "A check script's `--out` and `--tiny` arguments and its device; on the CPU (`--tiny` only) Triton's interpreter."
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument('--out', type=pathlib.Path, help=f'folder to write {name} into')
    p.add_argument('--tiny', action='store_true', help='small shapes: a smoke run in seconds, on the CPU too')
    a = p.parse_args()
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev == 'cpu':
        if not a.tiny: sys.exit('the full shapes need a GPU; --tiny runs on the CPU')
        os.environ.setdefault('TRITON_INTERPRET', '1')                  # before the kernels are defined
    return a, dev


def finish(out, name, res, failed):
    "Write `res` as `name` into folder `out` (if given) and exit with 1 if any check `failed`."
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(res, indent=1) + '\n')
    sys.exit(1 if failed else 0)


def main():
    a, dev = check_args(__doc__, 'check_layer_norm.json')
    import affmae.layer_norm as ln_mod
    if ln_mod.triton is None: sys.exit('Triton is not installed')
    t0, rows, failed = time.time(), [], False
    n, warm = (2, 1) if a.tiny else (20, 3)
    for R, C in (TINY if a.tiny else SHAPES):
        x, w, b, dy = make(R, C, dev)
        mods = modules(ln_mod, C, w, b, dev)
        abs_err, rel_err = {}, {}
        for name, (m, cast) in mods.items(): abs_err[name], rel_err[name] = errors(ln_mod, m, cast, x, w, b, dy, dev)
        ok = all(rel_err['triton'][k] < TOL[k] for k in TOL)
        xs = x.clone().requires_grad_()
        ms_fwd, ms_step, ms_graph, mb, replay_equal, capture_error = {}, {}, {}, {}, None, {}
        for name, (m, cast) in mods.items():
            fwd = lambda: step(m, cast, xs, dy, dev, backward=False)
            full = lambda: step(m, cast, xs, dy, dev)
            ms_fwd[name], ms_step[name] = timed(fwd, dev, n, warm), timed(full, dev, n, warm)
            if dev == 'cuda':
                mb[name] = peak_mb(full)
                try: graph, static = graphed(full)
                except RuntimeError as e:                               # e.g. a host sync while capturing
                    ms_graph[name], capture_error[name] = None, str(e).splitlines()[0]
                    ok &= name != 'triton'
                    continue
                ms_graph[name] = timed(graph.replay, dev, n, warm)
                if name == 'triton':                                    # deterministic kernels: replay == eager
                    replay_equal = all(torch.equal(s, e) for s, e in zip(static, full()))
                    ok &= replay_equal
                del graph, static
        failed |= not ok
        rows.append(dict(rows=R, C=C, x_dtype='float32', out_dtype='bfloat16', max_abs_err=abs_err, rel_err=rel_err,
                         ok=ok, ms_fwd=ms_fwd, ms_fwd_bwd=ms_step, ms_fwd_bwd_graph=ms_graph or None,
                         peak_mb=mb or None, graph_replay_equals_eager=replay_equal,
                         capture_error=capture_error or None))
    res = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (Triton interpreter)',
               torch=torch.__version__, triton=ln_mod.triton.__version__,
               date=datetime.datetime.now().isoformat(timespec='seconds'), command=' '.join(sys.argv),
               timing=f'median of {n} calls after {warm} warm-ups, CUDA events around each (wall clock on the CPU); '
                      'graph: replays of forward+backward captured in a CUDA graph',
               baseline='nn.LayerNorm under autocast (fp32 out) then .to(bfloat16), as a Linear casts its input',
               tolerance=TOL, cases=rows,
               configs={k.fn.__name__: {str(key): str(c) for key, c in k.cache.items()}
                        for k in (ln_mod._ln_fwd_kernel, ln_mod._ln_bwd_kernel)},
               seconds=round(time.time() - t0, 1))
    print(f"{res['device']}: torch {res['torch']}, triton {res['triton']}; fp32 in, bf16 out, under autocast")
    print(f"{'rows':>7} {'C':>4} | {'max abs err: y':>14} {'dx':>8} {'dw':>8} {'db':>8} | "
          f"{'fwd ms: nn+cast':>15} {'triton':>7} {'ratio':>6} | "
          f"{'fwd+bwd ms: nn+cast':>19} {'triton':>7} {'ratio':>6} | "
          f"{'graph ms: nn+cast':>17} {'triton':>7} {'ratio':>6} | {'peak MB: nn+cast':>16} {'triton':>7}")
    for r in rows:
        e, f, s, gr, m = r['max_abs_err']['triton'], r['ms_fwd'], r['ms_fwd_bwd'], r['ms_fwd_bwd_graph'], r['peak_mb']
        graph = (f"{gr['nn+cast']:17.3f} {gr['triton']:7.3f} {gr['nn+cast'] / gr['triton']:5.2f}x"
                 if gr and all(gr.values()) else f"{'-':>17} {'-':>7} {'-':>6}")
        mem = f"{m['nn+cast']:16.0f} {m['triton']:7.0f}" if m else f"{'-':>16} {'-':>7}"
        print(f"{r['rows']:>7} {r['C']:>4} | {e['y']:14.1e} {e['dx']:8.1e} {e['dw']:8.1e} {e['db']:8.1e} | "
              f"{f['nn+cast']:15.3f} {f['triton']:7.3f} {f['nn+cast'] / f['triton']:5.2f}x | "
              f"{s['nn+cast']:19.3f} {s['triton']:7.3f} {s['nn+cast'] / s['triton']:5.2f}x | {graph} | {mem}"
              + ('' if r['ok'] else '  FAIL')
              + (f"  capture failed: {r['capture_error']}" if r['capture_error'] else ''))
    for r in rows:
        print(f"nn.LayerNorm's own max abs errors at {r['rows']}x{r['C']}: "
              + ' '.join(f"{k} {v:.1e}" for k, v in r['max_abs_err']['nn+cast'].items()))
    print(f"{res['seconds']} s")
    finish(a.out, 'check_layer_norm.json', res, failed)


if __name__ == '__main__':
    main()
