"""Masks per second of `perlin_mask` and `random_mask` (affmae.masking): n masks of size×size at ratio 0.5,
on the CPU and, where there is one, on the GPU. Median of `--reps` timed calls after `--warmup` untimed ones;
CUDA work is synchronised before each clock read. Usage: PYTHONPATH=. python kernels/bench_masking.py"""
import argparse, datetime, platform, statistics, time
import torch
from affmae.masking import perlin_mask, random_mask, perlin_noise

def bench(fn, n, size, device, gen_device, reps, warmup):
    "Median seconds per call of `fn(n, size, 0.5)` building on `device` with a generator on `gen_device`."
    g = torch.Generator(gen_device).manual_seed(0)
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    for _ in range(warmup): fn(n, size, .5, generator=g, device=device)
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(n, size, .5, generator=g, device=device); sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)

def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--n', type=int, default=256); p.add_argument('--size', type=int, default=64)
    p.add_argument('--reps', type=int, default=20); p.add_argument('--warmup', type=int, default=3)
    a = p.parse_args()
    noise = lambda n, size, ratio, **kw: perlin_noise(n, size, **kw)   # the noise alone, without the ranking
    cases = [('cpu', 'cpu')]
    if torch.cuda.is_available(): cases += [('cuda', 'cuda'), ('cuda', 'cpu')]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} CPU threads), {dev}")
    print(f"# {a.n} masks of {a.size}x{a.size}, ratio 0.5, default noise; "
          f"median of {a.reps} after {a.warmup} warm-up\n")
    if torch.cuda.is_available():   # the contract on the GPU: exact counts, and a CPU generator gives the CPU's masks
        for fn in (perlin_mask, random_mask):
            mc = fn(a.n, a.size, .5, generator=torch.Generator().manual_seed(0), device='cuda')
            m = fn(a.n, a.size, .5, generator=torch.Generator().manual_seed(0))
            assert mc.is_cuda and (mc.flatten(1).sum(1) == round(.5 * a.size**2)).all()
            print(f"# {fn.__name__}: cuda == cpu masks from one CPU seed on "
                  f"{(mc.cpu() == m).float().mean().item():.4%} of cells")
    print('| masker | device | generator | ms / batch | masks / s |\n|---|---|---|---:|---:|')
    for name, fn in [('perlin_mask', perlin_mask), ('perlin_noise only', noise), ('random_mask', random_mask)]:
        for device, gen_device in cases:
            s = bench(fn, a.n, a.size, device, gen_device, a.reps, a.warmup)
            print(f'| {name} | {device} | {gen_device} | {s*1e3:.2f} | {a.n/s:,.0f} |', flush=True)

if __name__ == '__main__': main()
