"""Copy the real EM sets into a folder small enough to carry to the GPU machine (64 MiB a call, repository included).

Keeps the layout of `../shared/data` (folders, file names, classes.txt, licences); cuts every image and its mask to the
centre `--max`² pixels (lossless PNG); `--skip` leaves out folders by name (default: the unlabelled stacks).

    python kernels/prep_data_em.py ../shared/data data_em --max 512
"""
import argparse, shutil
from pathlib import Path
import numpy as np
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument('src'); p.add_argument('dst')
p.add_argument('--max', type=int, default=512, help='largest side kept (centre crop)')
p.add_argument('--skip', default='unlabelled', help='comma-separated folder names to leave out')
a = p.parse_args()
src, dst, skip = Path(a.src), Path(a.dst), set(a.skip.split(','))


def crop(im: np.ndarray) -> np.ndarray:
    h, w = im.shape[:2]
    y, x = max(0, (h - a.max) // 2), max(0, (w - a.max) // 2)
    return im[y:y + a.max, x:x + a.max]


n = 0
for f in sorted(src.rglob('*')):
    rel = f.relative_to(src)
    if f.is_dir() or skip & set(rel.parts): continue
    out = dst / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    if f.suffix.lower() in ('.png', '.tif', '.tiff'):
        Image.fromarray(crop(np.asarray(Image.open(f)))).save(out.with_suffix('.png'), optimize=True)
        n += 1
    else: shutil.copy(f, out)
size = sum(g.stat().st_size for g in dst.rglob('*') if g.is_file())
print(f"{n} images into {dst}: {size / 2**20:.1f} MiB")
