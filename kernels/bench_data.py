"""Data pipeline throughput on the GPU machine: is `affmae.data` ever the bottleneck of MAE pretraining?

Measures synth_em on CUDA and CPU, SynthEM pool generation, and pretrain_dls / segment_dls batches per second
(synthetic pool and 16-bit TIFF stacks on disk) at bs 48, 512^2, with 0 and 8 workers.
Run from the repo root: PYTHONPATH=.:$PYTHONPATH python kernels/bench_data.py"""
import time, tempfile, warnings
from pathlib import Path
import numpy as np, torch, tifffile
warnings.filterwarnings('ignore')
from affmae.synth import synth_em
from affmae.data import SynthEM, pretrain_dls, segment_dls

dev = torch.device('cuda')
def sync(): torch.cuda.synchronize()

def timeit(f, n=5):
    f(); sync(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); sync(); ts.append(time.perf_counter() - t)
    return min(ts)

rows = []
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
for s in (512, 1024, 2048):
    g = timeit(lambda: synth_em(s, 1, device=dev))
    c = timeit(lambda: synth_em(s, 1), n=3)
    rows.append(f"| synth_em {s}² | {1e3*g:.1f} ms (cuda) | {1e3*c:.0f} ms (cpu, {torch.get_num_threads()} threads) |")
t = time.perf_counter(); SynthEM(256, 512, device=dev); sync(); dt = time.perf_counter() - t
rows.append(f"| SynthEM(256, 512) pool on cuda | {dt:.2f} s | {256/dt:.0f} img/s |")

def loader_rate(dls, nb=20, warm=5):
    "Images per second over `nb` batches, after `warm` batches (the first ones pay for pinned-memory allocation)."
    it = iter(dls.train)
    for _ in range(warm): next(it)
    sync()
    t = time.perf_counter(); n = 0
    for _ in range(nb):   # synchronise every batch, as a training loop does when it reads the loss
        b = next(it); n += b[0].shape[0]; sync()
    sync(); return n/(time.perf_counter() - t)

dls = pretrain_dls('synthetic', size=512, bs=48, n_synth=512, device=dev, num_workers=0, epoch_len=48*26)
for name, dl in (('pin_memory off', dls.train.new(pin_memory=False)),
                 ('no batch transform', dls.train.new(after_batch=lambda b: b))):
    rows.append(f"| pretrain_dls synthetic, bs 48, 512², 0 workers, {name} | "
                f"{loader_rate(type('D', (), {'train': dl})):.0f} img/s | |")
for nw in (0, 8):
    dls = pretrain_dls('synthetic', size=512, bs=48, n_synth=512, device=dev, num_workers=nw, epoch_len=48*26)
    rows.append(f"| pretrain_dls synthetic, bs 48, 512², {nw} workers | {loader_rate(dls):.0f} img/s | |")
    dls = segment_dls(size=512, bs=48, n_synth=512, device=dev, num_workers=nw, epoch_len=48*26)
    rows.append(f"| segment_dls synthetic, bs 48, 512², {nw} workers | {loader_rate(dls):.0f} img/s | |")

d = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
for i in range(4):
    tifffile.imwrite(d/f'vol{i}.tif', rng.integers(0, 65535, (16, 2048, 2048), dtype=np.uint16))
for nw in (0, 8):
    dls = pretrain_dls(d, size=512, bs=48, device=dev, num_workers=nw, epoch_len=48*26)
    rows.append(f"| pretrain_dls 4 TIFF stacks 16x2048² uint16, bs 48, 512², {nw} workers | "
                f"{loader_rate(dls):.0f} img/s | |")
dls = pretrain_dls('synthetic', size=2048, bs=2, n_synth=8, device=dev, num_workers=0, epoch_len=2*26)
rows.append(f"| pretrain_dls synthetic, bs 2, 2048², 0 workers | {loader_rate(dls):.1f} img/s | |")
print("| what | result | |\n|---|---|---|\n" + "\n".join(rows))
