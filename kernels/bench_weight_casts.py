"""What casting a model's weights to bf16 costs a training step, and what batching the casts would save.

Under autocast every linear layer casts its fp32 weight (and bias) to bf16 in each forward, one small kernel each (the
256² profile of AFFMAE-Base counts 480 bf16 copies a step). Timed here on the weights of each model, each way replayed
from a CUDA graph (`triton.testing.do_bench_cudagraph`), with the kernels each way launches counted by the profiler:
(a) one `.to(bfloat16)` per tensor, as now; (b) `torch._foreach_copy_` into bf16 copies kept between steps; (c) one
copy of a flat fp32 buffer into a flat bf16 one (what parameters stored as views of one buffer would allow).
Usage: PYTHONPATH=. python kernels/bench_weight_casts.py --archs affmae_base,vitmae_base --out $OUT"""
import argparse, datetime, json, pathlib, sys
import torch


def ways(params):
    "name -> a function doing every cast once."
    bf = torch.bfloat16
    shadows = [torch.empty_like(p, dtype=bf) for p in params]
    flat32 = torch.cat([p.detach().flatten() for p in params])
    flat16 = torch.empty_like(flat32, dtype=bf)
    return {'per tensor .to': lambda: [p.to(bf) for p in params],
            '_foreach_copy_': lambda: torch._foreach_copy_(shadows, params),
            'one flat copy': lambda: flat16.copy_(flat32)}


def kernels(fn):
    "Kernels one call launches (profiler), after a warm-up call."
    fn(); torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_time_total > 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', default='affmae_base,vitmae_base')
    p.add_argument('--out', type=pathlib.Path)
    a = p.parse_args()
    if not torch.cuda.is_available(): sys.exit('bench_weight_casts.py needs a CUDA device')
    import triton.testing
    from affmae.registry import create_model
    rows = []
    for arch in a.archs.split(','):
        model = create_model(arch).cuda()
        params = [q for n, q in model.named_parameters() if q.ndim == 2 or n.endswith('bias')]   # what linears cast
        for name, fn in ways(params).items():
            ms = triton.testing.do_bench_cudagraph(fn, rep=50)
            rows.append(dict(arch=arch, way=name, tensors=len(params), elements=sum(q.numel() for q in params),
                             us=ms * 1e3, kernels=kernels(fn)))
            print(f"{arch:>12} {len(params):4d} tensors, {name:>15}: {ms * 1e3:8.1f} µs, "
                  f"{rows[-1]['kernels']} kernels")
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command=' '.join(sys.argv),
               date=datetime.datetime.now().isoformat(timespec='seconds'), cases=rows,
               timing='triton.testing.do_bench_cudagraph (rep 50 ms), µs per call')
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / 'bench_weight_casts.json').write_text(json.dumps(res, indent=1) + '\n')


if __name__ == '__main__':
    main()
