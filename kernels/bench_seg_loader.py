"""Fine-tuning's data path on the CPU: `segment_dls` training batches per second from a folder of images and masks,
with `EMFolder`'s cache of decoded images and masks (the default) and without it (`cache_mb=0`: every crop decodes
its whole image and mask again), in one process. The step on the GPU waits for this when `num_workers=0`.

    PYTHONPATH=. python kernels/bench_seg_loader.py data_em_a/drosophila-vnc \
        --out kernels/results/bench_seg_loader.json
"""
import argparse, json, os, platform, statistics, time
import torch
from affmae.data import segment_dls

p = argparse.ArgumentParser()
p.add_argument('folders', nargs='+', help='folders of images/ and masks/')
p.add_argument('--size', type=int, default=256)
p.add_argument('--bs', type=int, default=8)
p.add_argument('--batches', type=int, default=30)
p.add_argument('--out', default=None)
a = p.parse_args()


def batch_ms(folder, cache):
    "Median milliseconds per training batch after two warm-up batches (the cache, if on, fills in the first epoch)."
    dls = segment_dls(folder, size=a.size, bs=a.bs, valid_pct=0.2, seed=0, device='cpu')
    dl, src = dls.train, dls.train.dataset.src
    if not cache: src.cache_bytes = 0
    dl.dataset.n = dl.n = a.bs * (a.batches + 2)
    ts, t = [], time.perf_counter()
    for i, _ in enumerate(dl):
        now = time.perf_counter()
        if i >= 2: ts.append(1e3 * (now - t))
        t = now
    return statistics.median(ts)


res = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), size=a.size, bs=a.bs, rows=[])
for f in a.folders:
    off, on = batch_ms(f, False), batch_ms(f, True)
    res['rows'].append(dict(folder=f, no_cache_ms=round(off, 2), cache_ms=round(on, 2)))
    print(f"{f}: {off:.1f} ms/batch decoding every crop's image and mask, {on:.1f} ms with the cache "
          f"({off / on:.1f}x)", flush=True)
if a.out: open(a.out, 'w').write(json.dumps(res, indent=1))
