"""Benchmark of affmae.cluster_attention: median forward and forward+backward time of the Triton kernels against the
PyTorch reference (and dense SDPA over all tokens, the cost cluster attention avoids), each with and without the blank
token, at the AFF stage-1 shape (clusters of 8, neighbourhoods of 64, head dim 32, 4 heads, relative-position bias,
bf16) over a sweep of token counts. The sweep is declared as `triton.testing.Benchmark`s wrapped by `perf_report`; the
results (device, date, command, sizes, ms) go to a JSON file that nbs/03_cluster_attention.ipynb plots.
Neighbourhoods are the library's own (`affmae.clustering.cluster_tokens`) over random visible cells of a grid.
GPU (GPU time: median of CUDA-graph replays):
    PYTHONPATH=. python kernels/bench_cluster_attention.py
CPU smoke test (Triton's interpreter, tiny fp32 sizes, wall time: checks the script, measures nothing):
    TRITON_INTERPRET=1 PYTHONPATH=. python kernels/bench_cluster_attention.py --tiny"""
import argparse, datetime, json, os, pathlib, statistics, sys, time
import torch, triton
import torch.nn.functional as F
from triton.testing import Benchmark, do_bench, do_bench_cudagraph, perf_report
from affmae.cluster_attention import cluster_attention, cluster_attention_ref
from affmae.clustering import cluster_tokens

SCRIPT = 'kernels/bench_cluster_attention.py'
OUT = pathlib.Path(__file__).parent / 'results' / 'bench_cluster_attention.json'
PROVIDERS = {'triton': 'Triton', 'triton+blank': 'Triton + blank', 'torch': 'torch reference',
             'torch+blank': 'torch reference + blank', 'sdpa': 'dense SDPA (all tokens)'}
STYLES = [('tab:blue', '-'), ('tab:blue', '--'), ('tab:orange', '-'), ('tab:orange', '--'), ('tab:gray', ':')]
GPU_SHAPE = dict(B=8, H=4, D=32, Q=8, M=64, dtype='bfloat16')
TINY_SHAPE = dict(B=1, H=1, D=16, Q=8, M=16, dtype='float32')
EAGER = []   # points whose CUDA-graph capture failed, timed eagerly instead

def benchmarks(tiny: bool) -> list[Benchmark]:
    "One Benchmark per mode ('fwd', 'fwd+bwd'): time against tokens per image N, one line per provider."
    shape, ns = (TINY_SHAPE, [64, 128]) if tiny else (GPU_SHAPE, [2048 * 2**i for i in range(5)])
    return [Benchmark(x_names=['N'], x_vals=ns, line_arg='provider', line_vals=list(PROVIDERS),
                      line_names=list(PROVIDERS.values()), styles=STYLES, ylabel='ms', x_log=True, y_log=True,
                      plot_name=f'cluster-attention-{mode}', args={**shape, 'mode': mode})
            for mode in ('fwd', 'fwd+bwd')]

def neighbourhoods(B, N, Q, M, device):
    "nbhd_idx (B, N//Q, M) from `cluster_tokens`: N random cells of a grid of about 2N, as after a 50 % mask."
    side = int((2 * N)**.5) + 1
    cells = torch.stack([torch.randperm(side * side, device=device)[:N] for _ in range(B)])
    pos = torch.stack([cells % side, cells // side], -1).float()
    return cluster_tokens(pos, cluster_size=Q, nbhd_size=M).nbhd.int()

def wall_ms(fn, reps):
    "Median wall time of `reps` calls (CPU: the interpreter compiles nothing, so no warm-up)."
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

def bench(N, provider, B, H, D, Q, M, dtype, mode, reps=3):
    "Milliseconds of one call (forward, or forward and backward) of `provider` at N tokens per image."
    dev, dt = ('cuda' if torch.cuda.is_available() else 'cpu'), getattr(torch, dtype)
    g = torch.Generator(dev).manual_seed(N)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(B, H, N, M, device=dev, dtype=dt, generator=g, requires_grad=True)
    blank = tuple(torch.randn(H, D, device=dev, dtype=dt, generator=g, requires_grad=True) for _ in range(2))
    idx, do = neighbourhoods(B, N, Q, M, dev), torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g)
    opt = dict(blank=blank if provider.endswith('+blank') else None)
    f = {'triton': lambda: cluster_attention(q, k, v, idx, bias, impl='triton', check_idx=False, **opt),
         'torch': lambda: cluster_attention_ref(q, k, v, idx, bias, check_idx=False, **opt),
         'sdpa': lambda: F.scaled_dot_product_attention(q, k, v)}[provider.split('+')[0]]
    def fwd_bwd():
        f().backward(do)
        for t in (q, k, v, bias, *blank): t.grad = None
    fn = f if mode == 'fwd' else fwd_bwd
    if dev == 'cpu': return wall_ms(fn, reps)
    fwd_bwd()                                   # compile and autotune outside the graph capture
    torch.cuda.synchronize()
    try: return do_bench_cudagraph(fn, return_mode='median')
    except RuntimeError as e:                   # recorded in the JSON: this point includes launch overhead
        EAGER.append(f'{provider} {mode} N={N}: {str(e).splitlines()[0][:200]}')
        return do_bench(fn, return_mode='median')

def run(report, reps) -> list[dict]:
    "Evaluate every point of the report's Benchmarks (its `run` method would need pandas, absent on the GPU machine)."
    results = []
    for bm in report.benchmarks:
        ms = {p: [report.fn(**{bm.x_names[0]: x, bm.line_arg: p, **bm.args}, reps=reps) for x in bm.x_vals]
              for p in bm.line_vals}
        for p, t in ms.items(): print(bm.plot_name, p, ' '.join(f'{v:.4g}' for v in t), 'ms', flush=True)
        spec = {k: getattr(bm, k) for k in ('x_names', 'x_vals', 'line_arg', 'line_vals', 'line_names', 'styles',
                                            'xlabel', 'ylabel', 'x_log', 'y_log', 'plot_name', 'args')}
        results.append({**spec, 'ms': ms})
    return results

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tiny', action='store_true', help='tiny fp32 sizes for a CPU run under TRITON_INTERPRET=1')
    p.add_argument('--reps', type=int, default=3, help='timed calls per point on the CPU (the GPU uses CUDA graphs)')
    p.add_argument('--out', type=pathlib.Path, default=OUT, help='JSON file to write')
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not (gpu or a.tiny): raise SystemExit('no GPU: run with --tiny (and TRITON_INTERPRET=1) for a CPU smoke test')
    if not gpu and os.environ.get('TRITON_INTERPRET') != '1': raise SystemExit('a CPU run needs TRITON_INTERPRET=1')
    report = perf_report(benchmarks(a.tiny))(bench)
    meta = {'device': torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter)',
            'measurement': ('GPU time, median of CUDA-graph replays (triton.testing.do_bench_cudagraph)' if gpu else
                            'wall time of the Triton interpreter at tiny sizes: a smoke test, not a performance '
                            'measurement'),
            'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'command': ' '.join(['TRITON_INTERPRET=1'] * (not gpu) + ['PYTHONPATH=. python', SCRIPT] +
                                (argv if argv is not None else sys.argv[1:])),
            'torch': torch.__version__, 'triton': triton.__version__}
    res = {**meta, 'benchmarks': run(report, a.reps), 'timed_eagerly': EAGER}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + '\n')
    print('wrote', a.out)

if __name__ == '__main__': main()
