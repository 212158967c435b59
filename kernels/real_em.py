"""Real EM end to end (issue 13): pretraining on real micrographs, then fine-tuning at 10 % and 100 % of the labels.

Data (`--data`: one or more roots, comma-separated; each split of a set is taken from the first root that holds it),
the layout of `../shared/data` (its README has sources and licences):
  drosophila-vnc  images/ + masks/ (sections 0-15 train, 16-19 held out), unlabelled/stack2.tif; 5 classes
  sbem-mito       training/ (train), validation/ (held out), unlabelled/; background, mitochondria
  kidney-gbm      train/, test/ (held out); background, gbm
  podocyte-tem    4 unlabelled images (if absent: the copy that ships in affmae, `affmae.data.sample_dir()`)
Sets that are missing are skipped. A device call carries at most 64 MiB with the working tree, so the sets can
travel in several calls to the same warm machine as several ignored roots (`data_em*/`), named together in `--data`
(a set's held-out split or unlabelled images may sit in another root than its training split).
Everything is first copied into a work folder as uncompressed TIFF (memory-mapped crops; `--tiny`: centre crops of a
few images per split). How `prep_data_em.py` made each copy (its `prep.json`: crop, CLAHE) is recorded as `data_prep`;
roots equalised and plain together are refused (`prep_real_em_data.sh --clahe` equalises every image of a round).

1. MAE pretraining of `affmae_base` and `vitmae_base` through `affmae.data.pretrain_dls` + `affmae.learner.mae_learner`
   (bf16, warm-up + cosine, 50 % masks of kind `--mask`, by default the published Perlin quarters, raw-pixel targets or
   with `--pre-target hog` histograms of oriented gradients, `affmae.hog`) on
   every image that is not held out (training splits of the `--pre-sets`, all three by default whatever `--sets`
   fine-tunes on, and the unlabelled images and stacks of the `--pre-unlabelled` sets, podocyte TEM among them), the
   same number of steps for both; the held-out images are never seen, not even unlabelled. `--pre-share F`: a seeded
   share F of each of those folders' slices alone, the same steps (does a larger corpus make a better start?). A
   share `--pre-valid` of the pretraining images validates it. Crops come from each image in proportion to its area
   (`--balance`, `affmae.data.sample_weights`; `slice`: every image equally often, as runs 2-12 did, when the 100
   small kidney-gbm tiles would take 58 % of the crops), and are augmented by `--pre-augment` (`EMBatch`: dihedral
   flips by default; `full` adds affine, elastic and photometric).
   Recorded: per-step training loss, per-epoch validation loss per head, and on the validation images the levels to beat
   (`affmae.real_em.recon_levels`): trivial (the dataset mean everywhere) and the best Gaussian inpainting of the
   visible pixels; reconstruction figures. `--pre-image-path`: affmae pretrains as an `ImagePathMAE`, the `'unet'`
   segmentation head's image path trained as one more reconstruction head. `--save-pretrained DIR` keeps the pretrained
   models and their records; a later call (the same warm machine, with more time for fine-tuning) runs
   `--load-pretrained DIR` instead of pretraining; `--pretrain-only` stops here.
2. Per labelled set and label fraction (10 %, 100 % of the training images): `affmae.finetune.seg_learner` fine-tunes
   affmae_base and vitmae_base, each pretrained (layer-wise lr decay) and from scratch (`--skip` leaves some out,
   `--archs affmae_base` ViT-MAE-Base altogether), all for the same number of steps, with the segmentation head `--head`
   (its image path: `head_skip`); then `unet` from scratch for the wall-clock time that the pretrained affmae_base run
   took (the U-Net's cost a step and a fit in fastai's loop measured once a call, `loop_timing`); then
   (`--compare-head`, `--compare-decay-depth`) pretrained affmae_base with the other head or layer-wise decay depth, and
   (`--compare-lr`, `--compare-lr-decay`) each pretrained model at another peak lr or layer-wise lr decay, and
   (`--compare-frozen`) each transformer run with all but its head frozen (fastai's `freeze`, norms too: what the
   encoder's features carry alone; `trainable` counts what trains), and (`--compare-head-first N`) each pretrained model
   training its head alone for its first N steps (fastai's `fine_tune`: freeze, fit, unfreeze, fit), and
   (`--compare-head-lr X`) each pretrained model with its new head at peak lr X (`finetune --head-lr`), and
   (`--compare-steps N`) pretrained affmae_base for N steps (the U-Net's count: what the U-Net's lead owes to its
   steps), and (`--compare-zero-fuse`) pretrained affmae_base whose `'unet'` head starts from its image path alone
   (`head_zero_fuse`), and (`--compare-head-alone`) affmae_base's `'unet'` head alone from scratch, its backbone
   features zeros (`head_path_cpu.HeadAlone`: its image path against the U-Net), and (`--compare-aux W`,
   `--compare-path-drop P`) affmae_base pretrained and from scratch with a loss on its backbone's own logits at weight W
   (`seg_learner(aux_weight)`) or its head's image path dropped for a share P of the training images (`head_path_drop`),
   and (`--compare-fresh-head`) pretrained affmae_base with a fresh head though its pretraining trained one
   (`--pre-image-path`), and (`--compare-fresh-decoder`) pretrained affmae_base with its encoder alone loaded, its point
   decoder fresh (`finetune --fresh_decoder`), and (`--compare-pre-stats`) each pretrained model with its images
   normalised by its pretraining's mean and std (`finetune --pre-stats`; `--pre-stats`: every pretrained run so), and
   (`--compare-pretrained DIR,...`, beside `--load-pretrained`) affmae_base from each other kept pretraining, on the
   same draws as the rest (several pretrainings against one scratch run and one U-Net; each one's record is kept under
   `compare_pretrained`), each recorded as a `variant`. Runs from pretrained encoders peak at `--pre-ft-lr` (default
   the library's `PRETRAINED_LR`; their head at `--pre-head-lr` if given), the others at `--ft-lr`. Same crops
   (`--fg-crop P`: a share P of them placed on a foreground pixel), augmentation (`--augment`: dihedral flips, or
   `full`: flips, affine, elastic, photometric), loss (`--loss`, CE + Dice by default; `--class-weights auto`:
   `balanced_weights` of the run's labelled images) and AdamW one-cycle for every model. With `--ft-seeds`, all of
   this once per seed (its own labelled subset, initialisation and crops), each run a row with its `seed`. Every
   generator is seeded for each run (Python's, NumPy's, torch's and the training loader's): the same command scores
   the same on the CPU; on the GPU, up to its arithmetic's nondeterminism, and the U-Net's steps follow the clock.
3. Scores on the held-out images, whole, by sliding window (`affmae.inference.evaluate_model`; `--tta`: each tile
   also flipped and rotated, 8x the time): mIoU (all classes), foreground IoU (mean over foreground classes),
   foreground Dice; example predictions per set.

Step counts come from step times measured at the start (with the runs' loss and class weights), so the whole script
fits `--budget` seconds; a run that would end past it if as long as the last one is not started (`stopped_early`
names it; the runs done, their scores and figures are kept).
Writes six files to `--out` (the device machine returns at most 8): real_em.json (rewritten after every run),
pretrain_curves.png, recon_<arch>.png (first and last epoch's reconstructions, one per pretrained arch), scores.png
(held-out mIoU) and examples.png (the first held-out image of each set: truth and every model's prediction).

Run from the repository root:
  PYTHONPATH=.:$PYTHONPATH python kernels/real_em.py --data data_em --out $OUT --budget 450
  PYTHONPATH=. python kernels/real_em.py --data ../shared/data --out /tmp/real_em_tiny --tiny   # CPU check, < 2 min
  In two calls: ... --pretrain-only --save-pretrained runs/pre, then ... --load-pretrained runs/pre (a pretraining
  that --budget cut short: ... --pretrain-only --archs vitmae_base --save-pretrained runs/pre adds the other)
"""
import argparse, atexit, functools, gc, json, math, os, shutil, tempfile, time, warnings
# many fine-tuning runs in one process, each capturing its step: without expandable segments a capture failed and
# the next step ran out of memory with 68 GiB reserved but free (run 15, kernels/RESULTS.md)
os.environ.setdefault('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')
from pathlib import Path
import numpy as np, torch, tifffile
from PIL import Image
warnings.filterwarnings('ignore')

p = argparse.ArgumentParser()
p.add_argument('--data', default='data_em', help='root folder(s) of the sets, comma-separated')
p.add_argument('--out', default='runs/real_em')
p.add_argument('--budget', type=float, default=450., help='seconds for the whole script')
p.add_argument('--tiny', action='store_true', help='tiny models, crops and step counts on the CPU: checks the script')
p.add_argument('--archs', default=None,
               help='the transformers to pretrain or fine-tune (default both); with --pretrain-only, a second call can '
                    'pretrain the other into the same --save-pretrained folder; fine-tuning needs affmae first')
p.add_argument('--sets', default='drosophila-vnc,sbem-mito,kidney-gbm', help='labelled sets to fine-tune on')
p.add_argument('--pre-sets', default='drosophila-vnc,sbem-mito,kidney-gbm',
               help='labelled sets whose training splits join the pretraining corpus (held-out splits never do)')
p.add_argument('--pre-unlabelled', default=None,
               help="sets whose unlabelled images join the pretraining corpus (default: every set that has some; '': "
                    "none; with --pre-sets, one set's own images alone: pretraining in its domain)")
p.add_argument('--fracs', default='0.1,1.0', help='label fractions')
p.add_argument('--size', type=int, default=256, help='crop size for pretraining and fine-tuning (and the eval tile)')
p.add_argument('--pre-bs', type=int, default=32)
p.add_argument('--bs', type=int, default=8, help='fine-tuning batch size')
p.add_argument('--pre-frac', type=float, default=0.4, help='share of the budget left after timing spent pretraining')
p.add_argument('--pre-lr', default='1e-3,6e-4', help='peak pretraining lr of affmae, vitmae')
p.add_argument('--pre-epochs', type=int, default=5, help='pretraining epochs (one validation and figure each)')
p.add_argument('--pre-valid', type=float, default=0.1, help='share of the pretraining images held out to validate it')
p.add_argument('--pre-share', type=float, default=1.,
               help='pretrain on this share of the corpus: a seeded draw of the slices of each pretraining folder')
p.add_argument('--balance', default='area', choices=('area', 'slice', 'source'),
               help='how often pretraining crops come from each image (`affmae.data.sample_weights`)')
p.add_argument('--pre-augment', default='flips', choices=('none', 'flips', 'full'),
               help="pretraining crops' augmentation (`EMBatch`)")
p.add_argument('--mask', default='perlin_quarters', help='pretraining masks (`affmae.mae.MASKERS`) of both models')
p.add_argument('--pre-target', default='pixels', choices=('pixels', 'hog'),
               help="what both models' masked patches predict: pixels, or histograms of oriented gradients (07a_hog)")
p.add_argument('--save-pretrained', default=None, help='folder to keep the pretrained models and their records in')
p.add_argument('--load-pretrained', default=None,
               help='folder of an earlier --save-pretrained: fine-tune those models instead of pretraining')
p.add_argument('--pretrain-only', action='store_true',
               help='stop after pretraining (add --save-pretrained to keep the models)')
p.add_argument('--classes-only', action='store_true',
               help="count the held-out masks' pixels per class of every --sets set (test_class_pixels), then stop")
p.add_argument('--pre-steps', type=int, default=None, help='pretraining steps per arch (default: from the budget)')
p.add_argument('--ft-steps', type=int, default=None, help='fine-tuning steps per run (default: from the budget)')
p.add_argument('--ft-lr', type=float, default=1e-3, help='peak fine-tuning lr of the runs from scratch and the U-Net')
p.add_argument('--pre-ft-lr', type=float, default=None,
               help="peak fine-tuning lr of the runs from pretrained encoders (default: the library's, PRETRAINED_LR)")
p.add_argument('--pre-head-lr', type=float, default=None,
               help="peak lr of the pretrained runs' head (`finetune --head-lr`; default: the run's)")
p.add_argument('--workers', type=int, default=4,
               help='data-loading workers of pretraining and fine-tuning (the host prepares batches beside the step)')
p.add_argument('--augment', default='flips', help='fine-tuning augmentation of every model: none, flips or full')
p.add_argument('--fg-crop', type=float, default=0.,
               help='share of every model\'s training crops placed on a foreground pixel (`segment_dls(fg_crop)`)')
p.add_argument('--tta', action='store_true', help='held-out scores with test-time flips and rotations (8x the time)')
p.add_argument('--loss', default='ce_dice', help='fine-tuning loss of every model (`affmae.seg_metrics.LOSSES`)')
p.add_argument('--class-weights', default='', choices=('', 'auto'),
               help="fine-tuning class weights: none, or auto (`balanced_weights` of each run's labelled images)")
p.add_argument('--skip', default='',
               help="transformer runs to leave out, arch:init comma-separated (e.g. vitmae_base:scratch); never the "
                    "pretrained affmae run, which the U-Net's seconds are matched to")
p.add_argument('--lr-decay', type=float, default=0.75, help='layer-wise lr decay of pretrained encoders')
p.add_argument('--decay-depth', type=int, default=None, help='layer-wise decay over this many levels (`decay_steps`)')
p.add_argument('--seed', type=int, default=0, help='seed of pretraining and of the loaders')
p.add_argument('--ft-seeds', default=None,
               help='fine-tuning seeds, comma-separated (each: labelled subset, init, crops); default --seed')
p.add_argument('--head', default='unet',
               help="segmentation head's image path of the transformers (`head_skip`; default as `finetune`'s)")
p.add_argument('--compare-head', default='image',
               help='also fine-tune the pretrained affmae model with this head (empty: none)')
p.add_argument('--compare-decay-depth', type=int, default=None,
               help='also fine-tune the pretrained affmae model with layer-wise decay over this many levels')
p.add_argument('--compare-lr-decay', type=float, default=None,
               help="also fine-tune each pretrained model with this layer-wise lr decay (1: none)")
p.add_argument('--compare-lr', type=float, default=None,
               help='also fine-tune each pretrained model (affmae, and vitmae unless skipped) at this peak lr')
p.add_argument('--compare-frozen', action='store_true',
               help='also fine-tune each transformer run (pretrained and scratch) with all but its head frozen')
p.add_argument('--compare-head-first', type=int, default=None,
               help="also fine-tune each pretrained model training its head alone for this many of the run's steps "
                    "first (fastai's fine_tune)")
p.add_argument('--compare-head-lr', type=float, default=None,
               help="also fine-tune each pretrained model with its head at this peak lr (the rest at the run's)")
p.add_argument('--compare-zero-fuse', action='store_true',
               help="also fine-tune the pretrained affmae model with its 'unet' head's backbone channels at zero "
                    "(`head_zero_fuse`; needs --head unet)")
p.add_argument('--compare-head-alone', action='store_true',
               help="also fine-tune affmae's 'unet' head alone from scratch, its backbone features zeros")
p.add_argument('--compare-aux', type=float, default=None,
               help="also fine-tune affmae, pretrained and from scratch, with a loss on its backbone's own logits "
                    "at this weight (`seg_learner(aux_weight)`: deep supervision)")
p.add_argument('--compare-path-drop', type=float, default=None,
               help="also fine-tune affmae, pretrained and from scratch, its head's image path dropped per image with "
                    "this probability in training (`head_path_drop`; needs an image path)")
p.add_argument('--pre-image-path', action='store_true',
               help="pretrain affmae as an `ImagePathMAE`: with the 'unet' head's image path as one more "
                    "reconstruction head, so fine-tuning with --head unet starts that head pretrained too")
p.add_argument('--compare-fresh-head', action='store_true',
               help="also fine-tune pretrained affmae with its head fresh, though pretrained (--pre-image-path)")
p.add_argument('--compare-pretrained', default='',
               help='folders of other --save-pretrained runs (comma-separated): affmae fine-tuned from each too')
p.add_argument('--compare-fresh-decoder', action='store_true',
               help="also fine-tune pretrained affmae with its pretrained encoder alone, the decoder fresh "
                    "(`finetune --fresh_decoder`, as MAE's own fine-tuning)")
p.add_argument('--pre-stats', action='store_true',
               help="normalise the pretrained runs' images by their pretraining's mean and std, not the set's own")
p.add_argument('--compare-pre-stats', action='store_true',
               help="also fine-tune each pretrained model with its pretraining's mean and std (`finetune --pre-stats`)")
p.add_argument('--compare-steps', type=int, default=None,
               help='also fine-tune the pretrained affmae model for this many steps (its seconds grow with them)')
a = p.parse_args()
if a.compare_head_first is not None and not (a.ft_steps and 0 < a.compare_head_first < a.ft_steps):
    p.error(f"--compare-head-first {a.compare_head_first}: needs --ft-steps larger than it (got {a.ft_steps})")
if a.compare_steps is not None and a.compare_steps < 1: p.error(f"--compare-steps must be >= 1, got {a.compare_steps}")
if a.compare_zero_fuse and a.head != 'unet': p.error(f"--compare-zero-fuse needs --head unet, got --head {a.head}")
for o in ('pre_head_lr', 'compare_head_lr', 'compare_aux'):
    if getattr(a, o) is not None and getattr(a, o) <= 0: p.error(f"--{o.replace('_', '-')} must be positive")
if not 0 <= a.fg_crop <= 1: p.error(f"--fg-crop must be in [0, 1], got {a.fg_crop}")
if a.pre_stats and a.compare_pre_stats: p.error("--compare-pre-stats beside --pre-stats compares a run with itself")
for o in ('lr_decay', 'compare_lr_decay'):
    if getattr(a, o) is not None and not 0 < getattr(a, o) <= 1:
        p.error(f"--{o.replace('_', '-')} must be in (0, 1] (1: no decay), got {getattr(a, o)}")
if a.compare_lr_decay == a.lr_decay:
    p.error(f"--compare-lr-decay {a.compare_lr_decay} is --lr-decay: nothing to compare")
if a.compare_path_drop is not None and not (0 < a.compare_path_drop < 1 and a.head != 'none'):
    p.error(f"--compare-path-drop must be in (0, 1), with an image path; got {a.compare_path_drop}, --head {a.head}")
t0 = time.time()
tiny = a.tiny
dev = 'cpu' if tiny or not torch.cuda.is_available() else 'cuda'
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
S = 32 if tiny else a.size
PB, B = (4, 4) if tiny else (a.pre_bs, a.bs)
W = 0 if tiny else a.workers
BOTH = ['affmae_tiny', 'vitmae_tiny'] if tiny else ['affmae_base', 'vitmae_base']
ARCHS = a.archs.split(',') if a.archs else BOTH
if a.archs and (set(ARCHS) - set(BOTH) or not (a.pretrain_only or ARCHS[0] == BOTH[0])):
    p.error(f"--archs {a.archs}: one or both of {', '.join(BOTH)}; fine-tuning needs {BOTH[0]} first (the U-Net "
            "is matched to its seconds)")
UNET_KW = dict(width=8) if tiny else {}
FRACS = [float(f) for f in a.fracs.split(',')]
SEEDS = [int(x) for x in a.ft_seeds.split(',')] if a.ft_seeds else [a.seed]
PRE_LR = dict(zip(BOTH, map(float, a.pre_lr.split(','))))
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from fastai.data.core import DataLoaders
from fastai.torch_core import set_seed
from affmae.readers import image_info, read_plane, read_mask
from affmae.data import (EMFolder, EMCrops, EMBatch, EMDataLoader, pretrain_dls, segment_dls, pretrain_files,
                         sample_dir, source_shares, seed_run)
from affmae.learner import mae_learner
from affmae.registry import create_model
from affmae.finetune import seg_learner, label_subset, class_frequencies, balanced_weights, PRETRAINED_LR
from affmae.inference import evaluate_model, predict_plane
from affmae.seg_io import overlay, to_uint8
from affmae.graphs import StepGraph
from affmae.seg_metrics import seg_loss
from affmae.real_em import plot_pretraining, plot_scores, results_table, check_targets, targets_table, recon_levels
from head_path_cpu import HeadAlone                     # kernels/: the 'unet' head's image path alone

HEAD = dict(head_skip=a.head)
res = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu', torch=torch.__version__,
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), args=vars(a), tiny=tiny, size=S, pretrain_bs=PB,
           bs=B, archs=ARCHS, unet_kw=UNET_KW, head=a.head, timing={}, pretrain={}, sets={})
def log(*x): print(f'[{time.time() - t0:6.1f}s]', *x, flush=True)
def f3(v): return 'n/a' if v is None else f'{v:.3f}'
def save(): (out / 'real_em.json').write_text(json.dumps(res, indent=1))
def sync():
    if dev == 'cuda': torch.cuda.synchronize()
def free():
    """Give a finished run's GPU memory back: a Learner's callbacks hold it in a cycle, so `del` alone leaves its
    model, optimiser state and captured graph to a later garbage collection."""
    if dev == 'cuda': gc.collect(); torch.cuda.empty_cache()

# ---- data: every set as uncompressed TIFF in a work folder (train/test splits, unlabelled) ----
roots = [Path(r.strip()) for r in a.data.split(',') if r.strip()]
def data_prep(root):
    "How `prep_data_em.py` made the copies under `root` (each `prep.json`, by folder); {} for data used as it is."
    return {str(f.parent.relative_to(root)): json.loads(f.read_text()) for f in sorted(root.rglob('prep.json'))}
res['data_prep'] = {str(r): data_prep(r) for r in roots}
clahes = {json.dumps(q['clahe']) for r in roots for q in (res['data_prep'][str(r)] or {'.': {'clahe': None}}).values()}
if len(clahes) > 1:
    p.error(f"--data mixes CLAHE-equalised and plain copies ({', '.join(sorted(clahes))}): prepare them alike")
EQUALISED = clahes != {'null'}                                 # every root's images CLAHE-equalised by prep_data_em.py
def find(name, split):
    "The set folder `root/name` of the first root that holds the labelled split `split` (masks, classes.txt), or None."
    held = (r / name for r in roots if (r / name / 'classes.txt').is_file() and (r / name / split / 'masks').is_dir())
    return next(held, None)
SPLITS = {'drosophila-vnc': ('.', None), 'sbem-mito': ('training', 'validation'), 'kidney-gbm': ('train', 'test')}
UNLABELLED = {'drosophila-vnc': 'unlabelled', 'sbem-mito': 'unlabelled', 'podocyte-tem': '.'}
wanted, pre_sets = ([n for n in arg.split(',') if n] for arg in (a.sets, a.pre_sets))   # fine-tune; pretrain on
pre_unlabelled = list(UNLABELLED) if a.pre_unlabelled is None else [n for n in a.pre_unlabelled.split(',') if n]
if bad := sorted(set(pre_unlabelled) - set(UNLABELLED)):
    p.error(f"--pre-unlabelled {','.join(bad)}: no unlabelled images; known are {', '.join(UNLABELLED)}")
unknown = sorted(set(wanted + pre_sets) - set(SPLITS))
if unknown: p.error(f"unknown labelled set(s) {', '.join(unknown)}: known are {', '.join(SPLITS)}")
LOAD = Path(a.load_pretrained) if a.load_pretrained else None
if LOAD and a.pre_share != 1: p.error("--pre-share chooses pretraining images; --load-pretrained pretrains nothing")
if not 0 < a.pre_share <= 1: p.error(f"--pre-share must be in (0, 1], got {a.pre_share}")
if LOAD and a.pretrain_only: p.error("--load-pretrained and --pretrain-only exclude each other")
if LOAD and not (LOAD / 'pretrain.json').is_file(): p.error(f"{LOAD}: no pretrain.json (written by --save-pretrained)")
if LOAD and (gone := [x for x in ARCHS if not (LOAD / f'{x}.pt').is_file()]):
    p.error(f"{LOAD}: no pretrained {', '.join(gone)} (that run stopped before it; pretrain again)")
ALT = {Path(d).name: Path(d) for d in a.compare_pretrained.split(',') if d}     # other pretrainings, by folder name
if ALT and not LOAD: p.error("--compare-pretrained fine-tunes kept pretrainings beside --load-pretrained's")
if len(ALT) < len([d for d in a.compare_pretrained.split(',') if d]) or LOAD and LOAD.name in ALT:
    p.error(f"--compare-pretrained {a.compare_pretrained}: folders need names of their own (they name the variants)")
for d in ALT.values():
    if not ((d / 'pretrain.json').is_file() and (d / f'{ARCHS[0]}.pt').is_file()):
        p.error(f"--compare-pretrained {d}: no pretrain.json and {ARCHS[0]}.pt (written by --save-pretrained)")
SKIP = {x for x in a.skip.split(',') if x}
known = {f'{x}:{i}' for x in ARCHS for i in ('pretrained', 'scratch')}
if SKIP - known or f'{ARCHS[0]}:pretrained' in SKIP:
    p.error(f"--skip {a.skip}: one or more of {', '.join(sorted(known - {ARCHS[0] + ':pretrained'}))}")
if LOAD: pre_sets = []                                         # the pretraining data is not needed again
work = Path(tempfile.mkdtemp(prefix='real_em_'))
atexit.register(shutil.rmtree, work, ignore_errors=True)     # also when a run stops on an error

def to_tiff(planes, dst):
    "Write `planes` (a 2-D array or a stack) as an uncompressed TIFF; `--tiny`: their centre 96² crops."
    a = np.asarray(planes)
    if tiny:
        h, w = a.shape[-2:]; y, x = (h - 96) // 2, (w - 96) // 2
        a = a[..., y:y + 96, x:x + 96]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(dst, a, photometric='minisblack')

def copy_pairs(pairs, dst):
    for img, msk in pairs:
        to_tiff(read_plane(img), dst / 'images' / f'{img.stem}.tif')
        to_tiff(read_mask(msk).astype(np.uint8), dst / 'masks' / f'{img.stem}.tif')

def copy_unlabelled(src, dst):
    for f in pretrain_files(src)[:2 if tiny else None]:
        n = image_info(f)[0]
        planes = [read_plane(f, k, n) for k in range(min(n, 2) if tiny else n)]
        to_tiff(np.stack(planes) if n > 1 else planes[0], dst / f'{f.stem}.tif')

t = time.time()
sets, pre_paths = {}, []
for name in dict.fromkeys(wanted + pre_sets):                  # fine-tuned sets first, in order
    tr, te = SPLITS[name]
    root, te_root = find(name, tr), find(name, te or tr)
    if root is None or (name in wanted and te_root is None):
        log(f"{name}: {'held-out' if root else 'training'} split not found under {a.data}, skipped"); continue
    def pairs(d): return [(f, m) for f, m, _, _ in EMFolder(d, masks=True).files]
    if te is None: train, test = pairs(root)[:-4], pairs(root)[-4:]   # split the sections by index: last 4 held out
    else: train, test = pairs(root / tr), pairs(te_root / te) if name in wanted else []
    if tiny: train, test = train[:3], test[:1]
    copy_pairs(train, work / name / 'train')
    if name in pre_sets: pre_paths.append(work / name / 'train' / 'images')
    if name not in wanted: continue
    copy_pairs(test, work / name / 'test')
    classes, te_classes = ([l.strip() for l in (r / 'classes.txt').read_text().splitlines() if l.strip()]
                           for r in (root, te_root))
    if classes != te_classes: p.error(f"{name}: {root} and {te_root} name different classes")
    sets[name] = dict(train=work / name / 'train', test=work / name / 'test', classes=classes)
    counts = sum(np.bincount(read_mask(m).ravel(), minlength=len(classes))[:len(classes)]
                 for m in sorted((work / name / 'test' / 'masks').iterdir()))
    res['sets'][name] = dict(classes=classes, n_train=len(train), n_test=len(test),
                             test_images=[f.name for f, _ in test], test_class_pixels=counts.tolist(), runs=[])
    if not counts.all():               # such a class is left out of the held-out means (`affmae.seg_metrics.miou`)
        log(f"{name}: no held-out pixel of {', '.join(c for c, n in zip(classes, counts) if not n)}")
for name in ([] if LOAD else pre_unlabelled):                 # from the first root that holds them
    sub = UNLABELLED[name]
    src = next((r / name / sub for r in roots if (r / name / sub).exists()), None)
    if src is None and name == 'podocyte-tem':
        if EQUALISED: p.error("podocyte-tem: the shipped copy is not CLAHE-equalised like --data; add the "
                                      "equalised copy that `prep_real_em_data.sh --clahe` writes")
        src = sample_dir()
    if src is None: continue
    copy_unlabelled(src, work / 'unlabelled' / name)
    pre_paths.append(work / 'unlabelled' / name)
if not (LOAD or pre_paths): p.error("nothing to pretrain on: --pre-sets and --pre-unlabelled name no images found")

def keep_share(paths, share, seed):
    """A seeded draw of `share` of the slices of each folder in `paths` (at least one each), written under
    `pre_share/` (the training splits stay whole for fine-tuning): the folders and each one's (kept, all) slices."""
    rng, kept, counts = np.random.default_rng(seed), [], {}
    for src in paths:
        slices = [(f, k) for f in pretrain_files(src) for k in range(image_info(f)[0])]
        pick = sorted(rng.choice(len(slices), max(1, round(share * len(slices))), replace=False))
        dst = work / 'pre_share' / src.relative_to(work)
        for f in dict.fromkeys(slices[i][0] for i in pick):
            planes = [read_plane(f, k) for g, k in (slices[i] for i in pick) if g == f]
            dst.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(dst / f.name, planes[0] if len(planes) == 1 else np.stack(planes),
                             photometric='minisblack')
        kept.append(dst); counts[str(src.relative_to(work))] = (len(pick), len(slices))
    return kept, counts
if a.pre_share < 1: pre_paths, res['pre_share_slices'] = keep_share(pre_paths, a.pre_share, a.seed)
res['timing']['data_s'] = round(time.time() - t, 2)
res['pretrain_data'] = [str(p.relative_to(work)) for p in pre_paths]
log('data ready:', {k: (v['n_train'], v['n_test']) for k, v in res['sets'].items()},
    'pretraining on', res['pretrain_data'])
if a.classes_only:
    save(); log('held-out pixels per class in', out / 'real_em.json')
    raise SystemExit

# ---- step times (as the Learners run them: captured on CUDA, after warm-up: Triton compiles, cuDNN picks) ----
WARM, REPS = (1, 1) if tiny else (2, 3)
def timed(f, n):
    sync(); t = time.perf_counter()
    for _ in range(n): f()
    sync(); return (time.perf_counter() - t) / n

def step_time(model, batch, loss_func=None):
    "Seconds per training step of `model` on `batch` through `StepGraph` (warm-up, capture, replays on CUDA)."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev == 'cuda')
    sg = StepGraph(model, opt, amp=torch.bfloat16 if dev == 'cuda' else None, warmup=WARM, log=lambda s: None,
                   loss_func=loss_func)
    timed(lambda: sg(*batch), WARM + 1); r = timed(lambda: sg(*batch), REPS)
    del sg, opt; free(); return r

PRE_KW = lambda arch: dict(target=a.pre_target,
                           **({'image_path': True} if a.pre_image_path and arch.startswith('affmae') else {}))
def pre_timing(arch):
    return step_time(create_model(arch, **PRE_KW(arch)).to(dev), (torch.randn(PB, 1, S, S, device=dev),))

def ft_timing(arch, **kw):
    m = create_model(arch, 'segmentation', n_classes=5, **kw).to(dev)
    return step_time(m, (torch.randn(B, 1, S, S, device=dev), torch.randint(0, 5, (B, S, S), device=dev)),
                     seg_loss(a.loss, **({'weight': (1.,) * 5} if a.class_weights else {})))   # as the runs

T = res['timing']
for arch in ARCHS:
    if not LOAD: T[f'{arch}_pretrain_step_s'] = pre_timing(arch)
    if not a.pretrain_only: T[f'{arch}_finetune_step_s'] = ft_timing(arch, **HEAD)
if not a.pretrain_only:
    if a.compare_head: T['compare_finetune_step_s'] = ft_timing(ARCHS[0], head_skip=a.compare_head)
log('step times', {k: round(v, 4) for k, v in T.items() if k.endswith('step_s')})

OVERHEAD = 1.5                                               # fastai's per-step work, Learner set-up, loaders
# pretraining also validates, inpaints (the levels to beat) and draws every epoch: run 9 took 1.6-2.8x the step
PRE_OVERHEAD = 2.5
left = a.budget - (time.time() - t0) - (5 if tiny else 30)   # slack for figures and the last JSON
pre_steps = 0 if LOAD else a.pre_steps or (4 if tiny else max(50, int(a.pre_frac * left / len(ARCHS) / (max(
    T[f'{x}_pretrain_step_s'] for x in ARCHS) * PRE_OVERHEAD))))
res.update(pretrain_steps=pre_steps)
save()

# ---- 1. pretraining ----
states, alt_states = {}, {}                                   # by arch; ALT's affmae by name
PRE_KEYS = ('pretrain', 'pretrain_steps', 'pretrain_data', 'pre_share_slices')   # what pretrain.json keeps
if LOAD:                                                     # pretrained in an earlier call: its models, records
    saved = json.loads((LOAD / 'pretrain.json').read_text())
    res.update({k: saved[k] for k in PRE_KEYS if k in saved}, pretrained_in=saved['run'])
    T.update({k: v for k, v in saved['timing'].items() if 'pretrain' in k})
    states = {arch: torch.load(LOAD / f'{arch}.pt', map_location='cpu', weights_only=True) for arch in ARCHS}
    for f in LOAD.glob('*.png'): shutil.copy(f, out / f.name)
    log(f'pretrained models from {LOAD} ({saved["run"]["date"]}, {saved["pretrain_steps"]} steps)')
    for name, d in ALT.items():                                # affmae's alone: the variants fine-tune only it
        other = json.loads((d / 'pretrain.json').read_text())
        res.setdefault('compare_pretrained', {})[name] = dict(
            dir=str(d), run=other['run'], pretrain=other['pretrain'][ARCHS[0]],
            **{k: other[k] for k in PRE_KEYS[1:] if k in other})
        alt_states[name] = torch.load(d / f'{ARCHS[0]}.pt', map_location='cpu', weights_only=True)
else:
    EPOCHS = 2 if tiny else a.pre_epochs
    per_epoch = max(1, pre_steps // EPOCHS)
    keep = Path(a.save_pretrained) if a.save_pretrained else None
    def keep_model(arch):
        "Keep `arch`'s pretrained model (written whole, then renamed: never half a file) and the records so far."
        keep.mkdir(parents=True, exist_ok=True)
        torch.save(states[arch], keep / f'{arch}.tmp'); (keep / f'{arch}.tmp').replace(keep / f'{arch}.pt')
        rec = dict(run={k: res[k] for k in ('device', 'torch', 'date', 'args')}, timing=dict(T),
                   **{k: res[k] for k in PRE_KEYS if k in res})
        if (prev := keep / 'pretrain.json').is_file():  # the other arch, pretrained alike in an earlier call: kept
            prev = json.loads(prev.read_text())
            if all(prev[k] == rec[k] for k in ('pretrain_steps', 'pretrain_data')):
                rec['pretrain'], rec['timing'] = ({**prev[k], **rec[k]} for k in ('pretrain', 'timing'))
        tmp = keep / 'pretrain.tmp'; tmp.write_text(json.dumps(rec, indent=1)); tmp.replace(keep / 'pretrain.json')
    arch_s = 0.                                              # wall seconds of the last arch's pretraining
    for arch in ARCHS:
        if time.time() - t0 + 1.1 * arch_s > a.budget:       # the same steps again would end past the budget
            res['stopped_early'] = f'pretraining {arch}'; log(f'budget spent: stopping before pretraining {arch}')
            break
        t_arch = time.time()
        set_seed(a.seed)                                     # Python's, NumPy's and torch's: the loader draws from all
        dls = pretrain_dls(pre_paths, size=S, bs=PB, valid_pct=a.pre_valid, seed=a.seed, device=dev, num_workers=W,
                           epoch_len=PB * per_epoch, balance=a.balance, augment=a.pre_augment)
        learn = mae_learner(dls, arch, mask=a.mask, lr=PRE_LR[arch], precision='bf16' if dev == 'cuda' else None,
                            figs_dir=work / 'figures' / arch, **PRE_KW(arch))
        levels = recon_levels(learn.model, dls.valid)          # on the validation images: trivial and best blur levels
        trivial = levels['trivial']
        t = time.time()
        with learn.no_bar(): learn.fit_one_cycle(EPOCHS, PRE_LR[arch], pct_start=.1, moms=(.9, .9, .9))
        secs = time.time() - t
        w = learn.model.loss_weights
        res['pretrain'][arch] = dict(
            steps=per_epoch * EPOCHS, epochs=EPOCHS, lr=PRE_LR[arch], mask=a.mask, seconds=round(secs, 1),
            n_slices=len(dls.src), n_train=len(dls.train_ds), n_valid=len(dls.valid_ds), stats=list(dls.stats),
            balance=a.balance, augment=a.pre_augment, target=a.pre_target, share=a.pre_share,
            mix={str(Path(k).relative_to(work)): round(v, 4) for k, v in source_shares(
                dls.src, dls.train_ds.idxs, dls.train_ds.weights).items()},
            loss_weights=list(w), trivial_finest=trivial, trivial_total=trivial * sum(w), floor_finest=levels['floor'],
            floor_sigma=levels['floor_sigma'], blur_levels=levels['blur'],
            train_loss=[float(l) for l in learn.recorder.losses],
            valid=[[None if v is None else float(v) for v in vals] for vals in learn.recorder.values],
            valid_names=list(learn.recorder.metric_names[1:-1]))
        states[arch] = {k: v.detach().cpu() for k, v in learn.model.state_dict().items()}
        v = res['pretrain'][arch]['valid'][-1]
        log(f'pretrained {arch}: {v} (names {res["pretrain"][arch]["valid_names"]}), trivial {trivial:.3f} x {sum(w)}')
        del learn, dls; free(); save()
        if keep: keep_model(arch)
        figs = sorted((work / 'figures' / arch).glob('recon_*.png'))      # first and last epoch, one above the other
        ims = [Image.open(f).convert('RGB') for f in (figs[0], figs[-1])]
        both = Image.new('RGB', (max(i.width for i in ims), sum(i.height for i in ims)), 'white')
        both.paste(ims[0], (0, 0)); both.paste(ims[1], (0, ims[0].height)); both.save(out / f'recon_{arch}.png')
        arch_s = time.time() - t_arch
    fig = plot_pretraining(res); fig.savefig(out / 'pretrain_curves.png', dpi=90); plt.close(fig)
    if keep:
        for f in out.glob('*.png'): shutil.copy(f, keep / f.name)
        log('pretrained models kept in', keep)
HEAD_PRE = {arch: any(k.startswith('head.') for k in sd) for arch, sd in states.items()}   # an ImagePathMAE's
if a.compare_fresh_head and not HEAD_PRE.get(ARCHS[0]):
    p.error(f"--compare-fresh-head: the pretrained {ARCHS[0]} has no head (pretrain it with --pre-image-path)")
if len(states) < len(ARCHS) and not a.pretrain_only:
    p.error(f"pretrained only {', '.join(states) or 'nothing'} within --budget; fine-tuning needs {', '.join(ARCHS)}")
if a.pretrain_only:
    res['total_s'] = round(time.time() - t0, 1); save()
    log('done (pretraining only); results in', out / 'real_em.json'); raise SystemExit

# ---- 2. fine-tuning and 3. held-out scores ----
def set_dls(s):
    "Training crops of a set (`segment_dls`, no split) + its held-out images whole, in tiles, as the validation loader."
    dls = segment_dls(s['train'], size=S, bs=B, valid_pct=0, seed=a.seed, device=dev, codes=s['classes'],
                      num_workers=W, augment=a.augment, fg_crop=a.fg_crop)
    src = EMFolder(s['test'], masks=True)
    vdl = EMDataLoader(EMCrops(src, range(len(src)), S, train=False, masks=True, codes=s['classes'], tiles=True), bs=B,
                       device=dls.device, after_batch=EMBatch(*dls.stats, augment=False))
    new = DataLoaders(dls.train, vdl, device=dls.device)
    new.stats, new.codes, new.src, new.test_src = dls.stats, dls.codes, dls.src, src
    return new

patch_of = functools.cache(lambda arch: create_model(arch).patch)     # an arch's patch side, read off one model

def run(dls, s, arch, init, frac, steps, seed, variant=None, decay_depth=a.decay_depth, lr_decay=a.lr_decay, lr=None,
        frozen=False, head_first=0, head_lr=None, head_alone=False, fresh_head=False, pre_stats=False, alt=None,
        **kw):
    """Fine-tune one model for `steps` steps on `frac` of the labels (drawn by `seed`), the first `head_first` of them
    training the head alone; scores on the held-out images."""
    tds = dls.train.dataset
    def epoch(n): tds.n = dls.train.n = B * n                # the next fit's length: n steps
    tds.idxs = list(dls.all_idxs)
    label_subset(dls, frac, seed)
    seed_run(dls, seed)                                      # reproducible: every generator, the loader's own too
    pre = init == 'pretrained'
    by_pre = pre and (pre_stats or a.pre_stats)                # images normalised as in pretraining, not as the set
    pre_rec = res['compare_pretrained'][alt]['pretrain'] if alt else res['pretrain'].get(arch)   # `alt`: ALT's name
    norm = tuple(pre_rec['stats']) if by_pre else tuple(dls.stats)
    for dl in (dls.train, dls.valid): dl.after_batch.mean, dl.after_batch.std = norm
    weights = balanced_weights(class_frequencies(dls, len(s['classes']))) if a.class_weights else None
    lr = lr or (a.pre_ft_lr or PRETRAINED_LR if pre else a.ft_lr)
    head_lr = head_lr or (a.pre_head_lr if pre else None)
    model = HeadAlone(len(s['classes']), stride=patch_of(arch)) if head_alone else arch
    pre_sd = (alt_states[alt] if alt else states[arch]) if pre else {}
    has_head = any(k.startswith('head.') for k in pre_sd)           # an ImagePathMAE's pretrained head
    head_pre = has_head and not fresh_head
    sd = {k: v for k, v in pre_sd.items() if head_pre or not k.startswith('head.')} if pre else None
    learn = seg_learner(dls, model, pretrained=sd, classes=s['classes'],
                        loss_func=a.loss, loss_kw=dict(weight=weights),
                        lr_decay=lr_decay if pre and lr_decay < 1 else None,
                        decay_depth=decay_depth, per_class=False, freeze=frozen or head_first > 0,
                        head_lr_mult=(head_lr or lr)/lr, **kw)
    t = time.time()
    with learn.no_bar(), learn.no_logging():
        if head_first:                                       # as `finetune --freeze_epochs`: the head first, then all
            epoch(head_first); learn.fit_one_cycle(1, lr); learn.unfreeze()
        epoch(steps - head_first); learn.fit_one_cycle(1, lr)
    train_s = time.time() - t
    crop_miou = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))['miou']
    model = learn.model.eval()
    rec = dict(classes=s['classes'], stats=norm, tile=S)
    t = time.time()
    sc = evaluate_model(model, dls.test_src, rec, overlap=0.25, bs=16, device=dev, tta=a.tta)
    eval_s = time.time() - t
    fg = [v for c, v in list(sc['per_class'].items())[1:]]
    dice = [v['dice'] for v in fg if v['dice'] is not None]
    row = dict(arch=arch, init=init, label_frac=frac, n_labelled=len(tds.idxs), steps=steps, lr=lr,
               **({'head_pretrained': head_pre} if has_head else {}), **({'pretrained_in': alt} if alt else {}),
               **({'head_lr': head_lr} if head_lr else {}), **({'stats': list(norm)} if by_pre else {}),
               **{k: kw[k] for k in ('aux_weight', 'head_path_drop') if k in kw}, train_s=round(train_s, 2),
               eval_s=round(eval_s, 2), miou=sc['miou'], fg_iou=sc['fg_miou'],
               dice=float(np.mean(dice)) if dice else None,
               per_class=sc['per_class'], confusion=sc['confusion'],
               crop_miou=None if crop_miou != crop_miou else float(crop_miou),
               **({'class_weights': [round(w, 4) for w in weights]} if weights else {}),
               **({'head': kw['head_skip']} if 'head_skip' in kw else {}), **({'variant': variant} if variant else {}),
               **({'decay_depth': decay_depth} if decay_depth else {}),
               **({'lr_decay': lr_decay} if pre and lr_decay != a.lr_decay else {}),
               **({'seed': seed} if len(SEEDS) > 1 else {}),
               **({'trainable': sum(p.numel() for p in model.parameters() if p.requires_grad)} if frozen else {}))
    example = predict_plane(model, dls.test_src.image(0), rec, 0.25, 16, dev, tta=a.tta).astype(np.uint8)
    del learn, model; free()
    return row, example

CONFIGS = [(arch, init) for arch in ARCHS for init in ('pretrained', 'scratch') if f'{arch}:{init}' not in SKIP]
# more runs, (name, arch, init, run's keywords): pretrained affmae with the other head or another layer-wise decay
# depth; each pretrained model with another layer-wise decay or at another peak lr; each transformer run with all but
# its head frozen; each pretrained model training its head alone first; each pretrained model with the head at its own
# lr; pretrained affmae for another number of steps; pretrained affmae whose 'unet' head starts blind to the backbone;
# pretrained affmae whose pretrained head (--pre-image-path) starts fresh; pretrained affmae whose decoder starts
# fresh; affmae's 'unet' head alone, from scratch;
# affmae, pretrained and from scratch, with its backbone's own logits supervised too, or with its head's image path
# dropped for some images; each pretrained model with its images normalised as in pretraining
VARIANTS = ([(f'{a.compare_head} head', ARCHS[0], 'pretrained', dict(head_skip=a.compare_head))]
            if a.compare_head else []) + \
           ([(f'decay depth {a.compare_decay_depth}', ARCHS[0], 'pretrained',
              dict(HEAD, decay_depth=a.compare_decay_depth))] if a.compare_decay_depth else []) + \
           [(f'lr decay {a.compare_lr_decay:g}', arch, init, dict(HEAD, lr_decay=a.compare_lr_decay))
            for arch, init in CONFIGS if a.compare_lr_decay and init == 'pretrained'] + \
           [(f'lr {a.compare_lr:g}', arch, init, dict(HEAD, lr=a.compare_lr)) for arch, init in CONFIGS
            if a.compare_lr and init == 'pretrained'] + \
           [('frozen', arch, init, dict(HEAD, frozen=True)) for arch, init in CONFIGS if a.compare_frozen] + \
           [(f'head first {a.compare_head_first}', arch, init, dict(HEAD, head_first=a.compare_head_first))
            for arch, init in CONFIGS if a.compare_head_first and init == 'pretrained'] + \
           [(f'head lr {a.compare_head_lr:g}', arch, init, dict(HEAD, head_lr=a.compare_head_lr))
            for arch, init in CONFIGS if a.compare_head_lr and init == 'pretrained'] + \
           ([(f'{a.compare_steps} steps', ARCHS[0], 'pretrained', dict(HEAD, steps=a.compare_steps))]
            if a.compare_steps else []) + \
           ([('zero fuse', ARCHS[0], 'pretrained', dict(HEAD, head_zero_fuse=True))] if a.compare_zero_fuse else []) + \
           ([('fresh head', ARCHS[0], 'pretrained', dict(HEAD, fresh_head=True))] if a.compare_fresh_head else []) + \
           ([('fresh decoder', ARCHS[0], 'pretrained', dict(HEAD, fresh_decoder=True))]
            if a.compare_fresh_decoder else []) + \
           [(f'pretrained {name}', ARCHS[0], 'pretrained', dict(HEAD, alt=name)) for name in ALT] + \
           [('pretraining stats', arch, init, dict(HEAD, pre_stats=True)) for arch, init in CONFIGS
            if a.compare_pre_stats and init == 'pretrained'] + \
           ([('head alone', ARCHS[0], 'scratch', dict(head_skip='unet', head_alone=True))]
            if a.compare_head_alone else []) + \
           [(f'aux {a.compare_aux:g}', arch, init, dict(HEAD, aux_weight=a.compare_aux)) for arch, init in CONFIGS
            if a.compare_aux and arch == ARCHS[0]] + \
           [(f'path drop {a.compare_path_drop:g}', arch, init, dict(HEAD, head_path_drop=a.compare_path_drop))
            for arch, init in CONFIGS if a.compare_path_drop and arch == ARCHS[0]]
def loop_timing(dls, s, arch, n=(10, 60), **kw):
    """`arch`'s cost in fastai's loop on `dls`, as a run pays it: (seconds a step, seconds a fit beside its steps:
    capture, warm-up, validation), from three fits of a throwaway Learner (the first captures the step)."""
    tds, ts = dls.train.dataset, []
    tds.idxs = list(dls.all_idxs)
    learn = seg_learner(dls, arch, classes=s['classes'], loss_func=a.loss, per_class=False, **kw)
    with learn.no_bar(), learn.no_logging():
        for k in (n[0], *n):
            tds.n = dls.train.n = B * k
            t = time.time(); learn.fit(1, 1e-6); ts.append(time.time() - t)
    del learn; free()
    step = max(1e-4, (ts[2] - ts[1]) / (n[1] - n[0]))
    return step, max(0., ts[0] - n[0] * step)

examples, truths = {}, {}        # the first held-out image of each set: truth, and every run's prediction
class OverBudget(Exception): pass
run_s = dict(last=0.)            # seconds of the last run: a run that would end past the budget is not started
def budgeted(what, *args, **kw):
    """`run(*args, **kw)`, unless (as long as the last run) it would end past `--budget`: `OverBudget`, all kept. A run
    whose loader worker dies is run once more from the start (its row says why in `retried`)."""
    if time.time() - t0 + run_s['last'] > a.budget:
        res['stopped_early'] = what; log(f'budget spent: stopping before {what}'); raise OverBudget
    t = time.time()
    try: out = run(*args, **kw)
    except RuntimeError as e:                                # run 13 lost a run to a worker killed by SIGABRT
        if 'DataLoader worker' not in str(e): raise
        log(f'{what}: {e}; running it once more'); free()
        out = run(*args, **kw); out[0]['retried'] = str(e)
    run_s['last'] = time.time() - t
    return out
def fine_tune_set(name, s, dls, steps):
    "Every run of set `name` at every label fraction and seed (`OverBudget` stops it)."
    for frac in FRACS:
        for seed in SEEDS:                                   # example predictions: the first seed's
            tag = f' seed {seed}' if len(SEEDS) > 1 else ''
            ex = examples if seed == SEEDS[0] else {}
            for arch, init in CONFIGS:
                row, ex[name, frac, arch, init] = budgeted(f'{name} {frac:.0%}{tag} {arch} {init}', dls, s, arch, init,
                                                           frac, steps, seed, **HEAD)
                res['sets'][name]['runs'].append(row); save()
                log(f"{name} {frac:.0%}{tag} {arch} {init}: mIoU {f3(row['miou'])} fg IoU {f3(row['fg_iou'])} "
                    f"({row['train_s']:.1f} s + eval {row['eval_s']:.1f} s)")
            t_aff = next(r['train_s'] for r in reversed(res['sets'][name]['runs'])
                         if (r['arch'], r['init'], r['label_frac']) == (ARCHS[0], 'pretrained', frac))
            # the same seconds: the U-Net's step and fixed cost as fastai's loop pays them, measured once a call
            # (from the captured step alone, the Learner's cost per step of the transformer's run gave ~0.7x the time)
            if 'unet_loop_step_s' not in T:
                T['unet_loop_step_s'], T['unet_loop_fixed_s'] = loop_timing(dls, s, 'unet', **UNET_KW)
                log(f"unet in fastai's loop: {T['unet_loop_step_s'] * 1e3:.1f} ms a step, "
                    f"{T['unet_loop_fixed_s']:.1f} s a fit beside its steps")
            u_steps = max(10, int((t_aff - T['unet_loop_fixed_s']) / T['unet_loop_step_s']))
            if tiny: u_steps = min(u_steps, 2 * steps)          # the CPU check: mechanics, not the match
            row, ex[name, frac, 'unet', 'scratch'] = budgeted(f'{name} {frac:.0%}{tag} unet', dls, s, 'unet',
                                                              'scratch', frac, u_steps, seed, **UNET_KW)
            row['matched_to_s'] = t_aff
            res['sets'][name]['runs'].append(row); save()
            log(f"{name} {frac:.0%}{tag} unet: mIoU {f3(row['miou'])} fg IoU {f3(row['fg_iou'])} ({u_steps} steps, "
                f"{row['train_s']:.1f} s against {t_aff:.1f} s)")
            for variant, arch, init, kw in VARIANTS:
                kw = dict(kw); n = kw.pop('steps', steps)
                row, _ = budgeted(f'{name} {frac:.0%}{tag} {arch} {init}, {variant}', dls, s, arch,
                                  init, frac, n, seed, variant, **kw)
                res['sets'][name]['runs'].append(row); save()
                log(f"{name} {frac:.0%}{tag} {arch} {init}, {variant}: mIoU {f3(row['miou'])} fg IoU "
                    f"{f3(row['fg_iou'])}")

names = list(sets)
for si, name in enumerate(names):
    s = sets[name]
    dls = set_dls(s)
    dls.all_idxs = list(dls.train.dataset.idxs)
    res['sets'][name]['stats'] = list(dls.stats)           # the set's own normalisation (runs' `stats`: not)
    # steps for this set from the time left, shared by the sets still to run (unet: same time as affmae pretrained);
    # per run: scoring and ~4 s of set-up (model, Learner, loaders, warm-up and capture)
    left = a.budget - (time.time() - t0) - (5 if tiny else 20)
    test_tiles = sum(math.ceil(max(h - S, 0) / (0.75 * S) + 1) * math.ceil(max(w - S, 0) / (0.75 * S) + 1)
                     for h, w in (dls.test_src.shape(i) for i in range(len(dls.test_src))))
    # scoring: a forward is about a third of a training step; 2x slack, and CPU work per image
    eval_s = 2 / 3 * test_tiles * T[f'{ARCHS[0]}_finetune_step_s'] / B + 0.1 * len(dls.test_src) + 1
    # a variant's step: its model's, but for the other head's (timed apart); the U-Net runs affmae's seconds
    per_step = sum(T[f'{arch}_finetune_step_s'] for arch, _ in CONFIGS) + T[f'{ARCHS[0]}_finetune_step_s'] \
               + sum(T[f'{arch}_finetune_step_s'] if kw.get('head_skip') == a.head or kw.get('head_alone')
                     else T['compare_finetune_step_s'] for _, arch, _, kw in VARIANTS)
    runs_left, n_runs = (len(names) - si) * len(FRACS) * len(SEEDS), len(CONFIGS) + 1 + len(VARIANTS)
    steps = a.ft_steps or (4 if tiny else
                           max(20, int((left / runs_left - n_runs * (eval_s + 4)) / (per_step * OVERHEAD))))
    log(f'{name}: {steps} fine-tuning steps per run, {test_tiles} held-out tiles')
    try: fine_tune_set(name, s, dls, steps)
    except OverBudget: break
    truths[name] = np.array(dls.test_src.image(0)), dls.test_src.mask(0)
    del dls; free()

res['total_s'] = round(time.time() - t0, 1)
save()
fig = plot_scores(res, 'miou'); fig.savefig(out / 'scores.png', dpi=90); plt.close(fig)
# example predictions: per set, the first held-out image, its truth and every model, one row per label fraction
cols = ['image', 'truth'] + [f'{arch} {init}' for arch, init in CONFIGS] + ['unet']
rows = [(name, frac) for name in truths for frac in FRACS]
n = max(len(rows), 1)
fig, axs = plt.subplots(n, len(cols), figsize=(2.3 * len(cols), 2.5 * n), squeeze=False)
for r, (name, frac) in enumerate(rows):
    img, truth = truths[name]
    preds = [examples[name, frac, arch, init] for arch, init in CONFIGS] + [examples[name, frac, 'unet', 'scratch']]
    for c, (title, lbl) in enumerate(zip(cols, [None, truth] + preds)):
        ax = axs[r, c]
        ax.imshow(np.repeat(to_uint8(img)[..., None], 3, -1) if lbl is None else overlay(img, lbl))
        ax.set_title(title if r == 0 else '', fontsize=8); ax.set_xticks([]); ax.set_yticks([])
    axs[r, 0].set_ylabel(f"{name}\n{res['sets'][name]['test_images'][0]}, {frac:.0%} of labels", fontsize=7)
fig.tight_layout(); fig.savefig(out / 'examples.png', dpi=80); plt.close(fig)
print(results_table(res)); print(); print(targets_table(check_targets(res, *BOTH)))
log('done; results in', out / 'real_em.json')
