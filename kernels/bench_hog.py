"""What predicting histograms of oriented gradients instead of pixels (`target='hog'`, `affmae.hog`) costs a step.

One process, both models, both targets: `affmae.bench.run_bench` on each model built with `target='pixels'` and with
`target='hog'` (the targets computed from the batch inside the step, the heads sized to them), captured steps, bf16,
fused AdamW; then `hog_targets` alone on the same batch, replayed from a CUDA graph. Prints the step-time and memory
ratios HOG / pixels per model and writes one JSON.
Usage: PYTHONPATH=. python kernels/bench_hog.py --out $OUT/bench_hog.json [--size 512 --bs 32]
       PYTHONPATH=. python kernels/bench_hog.py --tiny --out /tmp/bench_hog.json     # CPU check of the script"""
import argparse, datetime, json, pathlib
import torch
from affmae.bench import run_bench
from affmae.hog import hog_targets
from affmae.measure import make_images

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument('--archs', default='affmae_base,vitmae_base')
p.add_argument('--size', type=int, default=512)
p.add_argument('--bs', type=int, default=32)
p.add_argument('--steps', type=int, default=10, help='timed steps (median reported)')
p.add_argument('--out', type=pathlib.Path, required=True)
p.add_argument('--tiny', action='store_true', help='tiny models, 64² images, eager steps on the CPU')
a = p.parse_args()
cuda = torch.cuda.is_available() and not a.tiny
archs = [x.replace('_base', '_tiny') if a.tiny else x for x in a.archs.split(',')]
size, bs = (64, 2) if a.tiny else (a.size, a.bs)
dev, modes = ('cuda', ['captured']) if cuda else ('cpu', ['eager'])
res = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), size=size, bs=bs,
           command='PYTHONPATH=. python kernels/bench_hog.py ' + ('--tiny' if a.tiny else
                   f'--archs {a.archs} --size {size} --bs {bs} --steps {a.steps}'))
for target in ('pixels', 'hog'):
    res[target] = run_bench(archs, [size], [bs], steps=a.steps, warmup=3, profile=False, device=dev, modes=modes,
                            model_kw=dict(target=target))
res['device'] = res['pixels']['device']

img = make_images(bs, size, dev)
if cuda:
    import triton.testing
    res['hog_targets_ms'] = triton.testing.do_bench_cudagraph(lambda: hog_targets(img, 8))
else:
    hog_targets(img, 8)
    res['hog_targets_ms'] = None

res['ratios'] = {}
for arch in archs:
    pix, hog = ({r['arch']: r for r in res[t]['records']}[arch] for t in ('pixels', 'hog'))
    res['ratios'][arch] = dict(step=hog['step_ms'] / pix['step_ms'], params=hog['params'] / pix['params'],
                               **({'memory': hog['peak_mem_gib'] / pix['peak_mem_gib']} if cuda else {}))
    print(f"{arch:>14} {size}² bs {bs}: pixels {pix['step_ms']:7.1f} ms, HOG {hog['step_ms']:7.1f} ms "
          f"({res['ratios'][arch]['step']:.3f}x)" + (f", memory {res['ratios'][arch]['memory']:.3f}x" if cuda else ''))
if cuda: print(f"hog_targets alone: {res['hog_targets_ms']:.3f} ms on {bs} images of {size}²")
a.out.parent.mkdir(parents=True, exist_ok=True)
a.out.write_text(json.dumps(res, indent=1))
