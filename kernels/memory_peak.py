"""What is alive at the peak of one training step on the GPU, by the line of affmae that allocated it.

Per model: a few eager steps (optimizer state made, kernels tuned), then one more with the CUDA caching allocator's
history recorded (`torch.cuda.memory._record_memory_history`). The trace is replayed to find the moment the step's
allocated bytes peak; the blocks alive then are grouped by the innermost stack frame inside `affmae/` (or the first
frame at all, for allocations made outside it, e.g. by the optimizer). Blocks made before the step and freed in it
(the previous step's gradients, at `zero_grad`) leave the count when freed, so the step's peak from the trace agrees
with `torch.cuda.max_memory_allocated`. Writes `memory_peak_{arch}_{S}_{B}.json`.
Usage: PYTHONPATH=. python kernels/memory_peak.py --archs affmae_base,vitmae_base --size 512 --bs 32 --out $OUT
(the trace analysis, `peak_breakdown`, is pure Python and tested on the CPU with a made-up trace)."""
import argparse, collections, json, time
from pathlib import Path


def _site(frames, inside='/affmae/'):
    "`file:line function` of the innermost frame whose file is in `inside`, else of the first Python frame."
    py = [f for f in frames if f.get('filename', '').endswith('.py')]
    f = next((f for f in py if inside in f['filename']), py[0] if py else None)
    return f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" if f else '(no Python frame)'


def peak_breakdown(trace, baseline=0, top=25):
    """Replay allocator `trace` entries (`action` 'alloc' / 'free_completed', `addr`, `size`, `frames`) on top of
    `baseline` bytes already allocated (a free of a block not allocated in the trace releases part of them): the
    peak, the entry index it happens at, and the bytes alive then by allocation site (largest first, `top` of them)
    and in all."""
    live, total, peak, at, peak_live = {}, 0, 0, -1, {}
    for i, e in enumerate(trace):
        if e['action'] == 'alloc':
            live[e['addr']] = e
            total += e['size']
        elif e['action'] == 'free_completed':
            total -= live.pop(e['addr'])['size'] if e['addr'] in live else e['size']
        else: continue
        if total > peak: peak, at, peak_live = total, i, dict(live)
    sites = collections.Counter()
    for e in peak_live.values(): sites[_site(e.get('frames', []))] += e['size']
    return dict(peak_bytes=baseline + peak, step_bytes_at_peak=peak, baseline_bytes=baseline, peak_entry=at,
                alive_at_peak=len(peak_live), by_site=dict(sites.most_common(top)))


def main():
    import torch
    from affmae.registry import create_model
    from affmae.measure import make_images, make_optimizer, train_step
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', default='affmae_base,vitmae_base')
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--top', type=int, default=25)
    p.add_argument('--out', default='runs/memory_peak')
    a = p.parse_args()
    if not torch.cuda.is_available(): raise SystemExit('memory_peak.py needs a CUDA device')
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    for arch in a.archs.split(','):
        torch.manual_seed(0)
        model = create_model(arch).cuda().train()
        opt, img = make_optimizer(model), make_images(a.bs, a.size, 'cuda')
        for _ in range(a.warmup): train_step(model, opt, img)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
        train_step(model, opt, img)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        res = peak_breakdown(snap['device_traces'][torch.cuda.current_device()], baseline, a.top)
        res |= dict(arch=arch, size=a.size, bs=a.bs, device=torch.cuda.get_device_name(), torch=torch.__version__,
                    date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                    command=f"python kernels/memory_peak.py --archs {arch} --size {a.size} --bs {a.bs}",
                    max_memory_allocated=torch.cuda.max_memory_allocated(),
                    params_bytes=sum(q.numel() * q.element_size() for q in model.parameters()))
        (out / f'memory_peak_{arch}_{a.size}_{a.bs}.json').write_text(json.dumps(res, indent=1))
        gib = lambda b: b / 2**30
        print(f"{arch} {a.size}² b{a.bs}: peak {gib(res['peak_bytes']):.2f} GiB from the trace "
              f"({gib(res['max_memory_allocated']):.2f} by the allocator), {gib(baseline):.2f} GiB before the step")
        for site, b in list(res['by_site'].items())[:12]: print(f"  {gib(b):7.3f} GiB  {site}")
        del model, opt, img; torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
