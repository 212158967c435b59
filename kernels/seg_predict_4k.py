"""Sliding-window segmentation of one 4096² micrograph on one GPU (issue 7): time and peak GPU memory of
`affmae.inference.sliding_window` (512² tiles, overlap 0.25, 8 tiles per batch, bf16 autocast, blended logits
accumulated on the CPU) for `affmae_base` and `vitmae_base` segmentation models (random weights: speed only).

Run from the repository root:  PYTHONPATH=.:$PYTHONPATH python kernels/seg_predict_4k.py
"""
import time, warnings
import torch
warnings.filterwarnings('ignore')
from affmae.registry import create_model
from affmae.inference import sliding_window, tile_starts
from affmae.synth import synth_em

img = synth_em(4096, seed=0, device='cuda')[0].cuda()
img = ((img - img.mean())/img.std())[None, None]
n_tiles = len(tile_starts(4096, 512, 384))**2
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; 4096² image, {n_tiles} tiles of 512², "
      "overlap 0.25, bs 8")
print('| model | params | seconds | tiles/s | peak GPU memory |\n|---|---:|---:|---:|---:|')
for arch in ('affmae_base', 'vitmae_base'):
    m = create_model(arch, 'segmentation').cuda().eval()
    sliding_window(m, img[..., :1024, :1024], tile=512, overlap=0.25, bs=8, out_device='cpu')     # warm-up (compiles)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = sliding_window(m, img, tile=512, overlap=0.25, bs=8, out_device='cpu')
    torch.cuda.synchronize(); s = time.perf_counter() - t
    assert out.shape == (1, 5, 4096, 4096) and torch.isfinite(out).all()
    print(f"| {arch} | {sum(p.numel() for p in m.parameters())/1e6:.1f} M | {s:.2f} | {n_tiles/s:.1f} | "
          f"{torch.cuda.max_memory_allocated()/2**30:.2f} GiB |")
    del m, out; torch.cuda.empty_cache()
