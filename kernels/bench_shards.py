"""Do streamed WebDataset shards keep a GPU fed? Pack EM images into shards, then pretrain from them and compare the
time each step waits for its batch (data time) with the time the step itself takes (target: data < 5 % of the step).

One GPU (AFFMAE-Base, 512², batch 32, bf16), from the repository root:
    PYTHONPATH=.:/tmp/site python3 kernels/bench_shards.py --images DIR --out RESULT.json
Several GPUs (kernels/scale_ddp.sh): the same under `python3 -m torch.distributed.run --nproc_per_node N`; each
process streams its share, rank 0 packs (once: --shards DIR is reused when it holds a shards.json) and writes the JSON.
CPU check of the script: python kernels/bench_shards.py --tiny --out /tmp/bench_shards.json

Needs affmae's requirements (torch, fastai, fastcore, tifffile, pillow, safetensors, matplotlib) and webdataset,
which imports braceexpand, numpy and PyYAML: without a network, carry their wheels (`bash ../shared/gpu-wheels.sh`
fetches webdataset and braceexpand; add pyyaml there if the machine lacks it).
"""
import argparse, json, statistics, sys, tempfile, time
from pathlib import Path
import torch
from fastai.callback.core import Callback

p = argparse.ArgumentParser()
p.add_argument('--images', help='folder (or TIFF stack) of EM images to pack; --tiny without it: synthetic EM')
p.add_argument('--out', required=True, help='result JSON')
p.add_argument('--shards', help='shard folder (default: a temporary one); reused if it holds a shards.json')
p.add_argument('--shard-size', type=int, default=256, help='images per shard')
p.add_argument('--arch', default='affmae_base')
p.add_argument('--size', type=int, default=512, help='crop size')
p.add_argument('--bs', type=int, default=32, help='batch size per process')
p.add_argument('--steps', type=int, default=30, help='measured steps')
p.add_argument('--warmup', type=int, default=5, help='steps before measuring (compilation, autotuning, capture)')
p.add_argument('--workers', type=int, default=8, help='data-loading workers per process')
p.add_argument('--buffer', type=int, default=256, help='shuffle buffer (samples per worker)')
p.add_argument('--no-capture', action='store_true', help='eager steps (DDP runs are eager anyway)')
p.add_argument('--tiny', action='store_true', help='a tiny model, 64² crops, batch 4, a few steps: checks the script')
a = p.parse_args()
if a.tiny:
    a.arch, a.size, a.bs, a.steps, a.warmup, a.workers, a.shard_size = 'affmae_tiny', 64, 4, 4, 1, 2, 8
try: import webdataset  # noqa: F401  (the shards' reader and writer)
except ImportError as e: sys.exit(f"bench_shards: webdataset does not import ({e}): install it or carry its wheels")
from affmae.distributed import init_distributed, world, barrier, data_parallel
from affmae.shards import pack_shards, shard_dls, INDEX
from affmae.learner import mae_learner

rank, n_procs = init_distributed(), world()[1]
cuda = torch.cuda.is_available() and not a.tiny
tmp = Path(tempfile.mkdtemp())
shards = Path(a.shards) if a.shards else tmp / 'shards'


def synthetic_images(folder: Path, n: int = 24, size: int = 96) -> Path:
    "`n` synthetic EM images of `size`² as 8-bit TIFFs in `folder` (for --tiny without --images)."
    import numpy as np, tifffile
    from affmae.synth import synth_em
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tifffile.imwrite(folder / f'{i:03d}.tif', (synth_em(size, seed=i)[0].numpy() * 255).astype(np.uint8))
    return folder


pack = None
if rank == 0 and not (shards / INDEX).is_file():
    images = a.images or synthetic_images(tmp / 'images')
    t0 = time.perf_counter()
    files = pack_shards(images, shards, size=a.shard_size)
    dt = time.perf_counter() - t0
    mb = sum(f.stat().st_size for f in files) / 2**20
    pack = dict(images=str(images), n_shards=len(files), mb=round(mb, 1), s=round(dt, 2), mb_s=round(mb / dt, 1))
    print(f"packed {images} into {len(files)} shards, {mb:.0f} MB in {dt:.1f} s", flush=True)
barrier()
index = json.loads((shards / INDEX).read_text())
pattern = f"{shards}/shard-{{000000..{len(index['shards']) - 1:06d}}}.tar"


class StepTimes(Callback):
    "Per training step: the wait for the batch (data) and the step itself, the GPU synchronised at both ends."
    order = -30
    def before_fit(self): self.data, self.step, self.last, self.t_fit = [], [], None, time.perf_counter()
    def before_batch(self):
        if cuda: torch.cuda.synchronize()
        now = time.perf_counter()
        self.data.append(now - (self.last if self.last is not None else self.t_fit))
        self.start = now
    def after_batch(self):
        if not self.training: return
        if cuda: torch.cuda.synchronize()
        self.last = time.perf_counter()
        self.step.append(self.last - self.start)


t0 = time.perf_counter()
dls = shard_dls(pattern, size=a.size, bs=a.bs, valid_pct=0, num_workers=a.workers, buffer=a.buffer,
                epoch_len=(a.warmup + a.steps) * a.bs * n_procs)
t_dls = time.perf_counter() - t0
timer = StepTimes()
learn = mae_learner(dls, a.arch, precision='bf16' if cuda else None, capture=cuda and not a.no_capture, cbs=[timer])
data_parallel(learn)
with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)
data, step = timer.data[a.warmup:], timer.step[a.warmup:]
wall = sum(data) + sum(step)
res = dict(device=torch.cuda.get_device_name() if cuda else 'cpu', processes=n_procs, torch=torch.__version__,
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), command=' '.join(sys.argv),
           sizes=dict(arch=a.arch, crop=a.size, bs_per_process=a.bs, steps=len(step), warmup=a.warmup,
                      workers=a.workers, buffer=a.buffer, images=index['n'], shards=len(index['shards']),
                      captured=any(getattr(c, 'graph', None) is not None for c in learn.cbs)),
           pack=pack, loaders_s=round(t_dls, 3), first_batch_s=round(timer.data[0], 3),
           data_ms=round(1e3 * statistics.median(data), 2), step_ms=round(1e3 * statistics.median(step), 2),
           data_frac=round(sum(data) / wall, 4), img_s=round(len(step) * a.bs * n_procs / wall, 2))
res['target_met'] = res['data_frac'] < 0.05
if rank == 0:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
