"""The column sums a training step makes in its backward pass, timed on the GPU: a linear layer's bias gradient
(`dout.sum(0)` of bf16 rows `(R, O)`) and the LayerNorm backward's final sum of its fp32 partials `(G, 2C)`, each
against the same sum as a matrix-vector product (cuBLAS) and, for the bias, with an fp32 result.

Each candidate is timed alone, replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`, so launch gaps inside
a graph count, Python does not), and checked against the float64 sum (max relative error). Prints one table per kind
and writes `bench_bias_grad.json`.
Usage: PYTHONPATH=. python kernels/bench_bias_grad.py --out kernels/results   (--tiny: CPU smoke run, wall clock)"""
import argparse, datetime, json, pathlib, sys, time
import torch

BIAS = [(4096, 384), (4096, 768), (4096, 1152), (4096, 1536), (4096, 3072), (16384, 512), (65536, 128),
        (65536, 384), (65536, 512), (262144, 128)]
PART = [(528, 128), (528, 256), (528, 384), (528, 512), (528, 768)]         # (G programs, C): 4 per SM of an H200


def candidates(t, kind):
    "name -> function of the rows `t`, each returning the column sums."
    ones = torch.ones(t.shape[0], device=t.device, dtype=t.dtype)
    c = {'sum': lambda: t.sum(0), 'mv': lambda: torch.mv(t.t(), ones), 'ones @ t': lambda: ones[None] @ t}
    if kind == 'bias': c['sum fp32 out'] = lambda: t.sum(0, dtype=torch.float32)
    return c


def timed_ms(fn, dev):
    if dev == 'cuda':
        import triton.testing
        return triton.testing.do_bench_cudagraph(fn, rep=50)
    t = time.perf_counter()
    for _ in range(3): fn()
    return (time.perf_counter() - t) / 3 * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', type=pathlib.Path)
    p.add_argument('--tiny', action='store_true')
    a = p.parse_args()
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev == 'cpu' and not a.tiny: sys.exit('the full shapes need a GPU; --tiny runs on the CPU')
    rows = []
    for kind, shapes, dt in (('bias', BIAS, torch.bfloat16), ('layer_norm partials', PART, torch.float32)):
        for R, O in (shapes[:2] if a.tiny else shapes):
            t = torch.randn(R, 2 * O if kind != 'bias' else O, device=dev).to(dt)
            ref = t.double().sum(0)
            ms, err = {}, {}
            for name, fn in candidates(t, kind).items():
                err[name] = ((fn().double().flatten() - ref).abs().max() / ref.abs().max()).item()
                ms[name] = timed_ms(fn, dev)
            rows.append(dict(kind=kind, rows=R, cols=t.shape[1], dtype=str(dt).split('.')[-1], ms=ms, max_rel_err=err))
            best = min(ms, key=ms.get)
            print(f"{kind:>20} {R:>7} x {t.shape[1]:<5}: " + '  '.join(f"{k} {v * 1e3:7.1f} µs" for k, v in ms.items())
                  + f"  | best: {best} ({ms['sum'] / ms[best]:.2f}x sum)")
    res = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu', torch=torch.__version__,
               date=datetime.datetime.now().isoformat(timespec='seconds'), command=' '.join(sys.argv),
               timing='triton.testing.do_bench_cudagraph (rep 50 ms), ms per call' if dev == 'cuda' else 'wall clock',
               cases=rows)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / 'bench_bias_grad.json').write_text(json.dumps(res, indent=1) + '\n')


if __name__ == '__main__':
    main()
