"""Copy the real EM sets into a folder small enough to carry to the GPU machine (64 MiB a call, repository included).

Keeps the layout of `../shared/data` (folders, file names, classes.txt, licences); cuts every image and its mask to the
centre `--max`² pixels (lossless PNG); `--skip` leaves out folders by name (default: the unlabelled stacks);
`--limit N` keeps the first N images (and their masks) of each folder; `--full` names images (and their masks) kept
whole, e.g. a held-out split that must be scored on every pixel; `--clahe` equalises the images (not the masks)
with `affmae.prep.clahe` (the published preprocessing; OpenCV, which the GPU machine lacks, so it runs here).
`dst/prep.json` records how the copy was made, for a run on it to record (`kernels/real_em.py`).
A multi-page TIFF (a stack) keeps every plane, each cut the same way, as a multi-page TIFF.

    python kernels/prep_data_em.py ../shared/data data_em --max 512
    PYTHONPATH=. python kernels/prep_data_em.py data_em data_abl_clahe --limit 50 --clahe   # the ablation's copy
    python kernels/prep_data_em.py ../shared/data/drosophila-vnc data_em_a/drosophila-vnc --max 640 --skip '' \
        --full vnc16,vnc17,vnc18,vnc19       # training sections cut, the held-out ones whole (all five classes)
"""
import argparse, json, shutil
from pathlib import Path
import numpy as np, tifffile
from PIL import Image, ImageSequence

p = argparse.ArgumentParser()
p.add_argument('src'); p.add_argument('dst')
p.add_argument('--max', type=int, default=512, help='largest side kept (centre crop)')
p.add_argument('--skip', default='unlabelled', help='comma-separated folder names to leave out')
p.add_argument('--limit', type=int, default=None, help='first N images of each folder')
p.add_argument('--full', default='', help='comma-separated file names (without suffix) kept whole')
p.add_argument('--clahe', action='store_true', help='CLAHE (clip 4, 8x8 tiles) on the images, not on the masks')
a = p.parse_args()
src, dst, skip, full = Path(a.src), Path(a.dst), set(a.skip.split(',')), set(a.full.split(','))
if a.clahe: from affmae.prep import clahe, CLAHE_CLIP, CLAHE_TILES


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
        if a.limit is not None and sorted(f.parent.iterdir()).index(f) >= a.limit: continue
        planes = [np.asarray(im) for im in ImageSequence.Iterator(Image.open(f))]
        if f.stem not in full: planes = [crop(im) for im in planes]
        if a.clahe and 'masks' not in rel.parts:
            planes = [clahe(im) for im in planes]
        if len(planes) > 1: tifffile.imwrite(out.with_suffix('.tif'), np.stack(planes), photometric='minisblack')
        else: Image.fromarray(planes[0]).save(out.with_suffix('.png'), optimize=True)
        n += len(planes)
    else: shutil.copy(f, out)
(dst / 'prep.json').write_text(json.dumps(dict(max=a.max, full=sorted(full - {''}), limit=a.limit,
                                              clahe=dict(clip=CLAHE_CLIP, tiles=CLAHE_TILES) if a.clahe else None)))
size = sum(g.stat().st_size for g in dst.rglob('*') if g.is_file())
print(f"{n} planes into {dst}: {size / 2**20:.1f} MiB")
