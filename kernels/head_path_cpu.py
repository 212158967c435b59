"""Does the segmentation head's `'unet'` image path draw a thin membrane as well as the U-Net? A CPU experiment.

The U-Net (`unet`) leads pretrained AFFMAE-Base on kidney-gbm's basement membrane in every GPU draw (`12_real_em`),
though AFFMAE-Base's head (`UpHead(skip='unet')`) holds a U-Net's encoder path of the same widths, and 2.4x the steps
close only a quarter of that lead. This trains that head alone, its backbone features replaced by zeros so that the
image path decides every logit, beside the U-Net, each from scratch on the same labelled tiles, crops, flips, loss,
steps and lr, and scores both on the held-out tiles. Level scores put the gap in the transformer's fusion or its
training; a lower score for the head's path puts it in the path itself (GroupNorm and GELU against BatchNorm and
ReLU, bilinear upsampling against transposed convolutions, no stride-16 level).
    PYTHONPATH=. python kernels/head_path_cpu.py --train data_em_e/kidney-gbm/train --test data_em_d/kidney-gbm/test \
        --out kernels/results/head_path_cpu.json
"""
import argparse, datetime, json, time
from pathlib import Path
import torch, torch.nn as nn
from affmae.data import EMFolder, read_classes, segment_dls
from affmae.finetune import label_subset, seg_learner
from affmae.inference import evaluate_model
from affmae.registry import create_model
from affmae.seg_models import UpHead, pad_to


class HeadAlone(nn.Module):
    "`UpHead(skip='unet')` on zero backbone features: its image path alone decides every logit."
    def __init__(self, n_classes, stride=8, dim=8):
        super().__init__()
        self.stride, self.dim = stride, dim
        self.head = UpHead(dim, n_classes, stride=stride, skip='unet')

    def forward(self, img):
        H, W = img.shape[-2:]
        x = pad_to(img, self.stride)
        feats = x.new_zeros(x.shape[0], self.dim, x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        return self.head(feats, x)[..., :H, :W]


MODELS = {'unet': lambda n: create_model('unet', 'segmentation', n_classes=n), 'head_alone': HeadAlone,
          # the same head beside a small transformer (from scratch), its backbone channels at first random or zero
          'affmae_tiny': lambda n: create_model('affmae_tiny', 'segmentation', n_classes=n, head_skip='unet'),
          'affmae_tiny_zero_fuse': lambda n: create_model('affmae_tiny', 'segmentation', n_classes=n,
                                                          head_skip='unet', head_zero_fuse=True),
          # and with the transformer's own logits supervised too (deep supervision, `seg_learner(aux_weight)`)
          'affmae_tiny_aux': lambda n: create_model('affmae_tiny', 'segmentation', n_classes=n, head_skip='unet',
                                                    head_aux=True),
          # or with the head's image path dropped for half the training images (`head_path_drop`)
          'affmae_tiny_path_drop': lambda n: create_model('affmae_tiny', 'segmentation', n_classes=n,
                                                          head_skip='unet', head_path_drop=.5)}
AUX_WEIGHTS = {'affmae_tiny_aux': .4}

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--train', required=True, help='labelled training folder (images/, masks/; classes.txt above it)')
    p.add_argument('--test', required=True, help='held-out folder (images/, masks/)')
    p.add_argument('--size', type=int, default=128, help='training crop side')
    p.add_argument('--bs', type=int, default=8)
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--frac', type=float, default=0.1, help='share of the training tiles whose labels are used')
    p.add_argument('--seeds', default='0,1', help='draws of the labelled tiles (and init and crops), comma-separated')
    p.add_argument('--models', default='unet,head_alone', help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', required=True, help='results JSON')
    a = p.parse_args()
    for f in (a.train, a.test):
        if not (Path(f) / 'images').is_dir(): p.error(f"{f}: no images/ folder")
    if min(a.size, a.bs, a.steps) < 1 or a.size % 16:
        p.error('--size (a multiple of 16), --bs and --steps must be positive')
    models = a.models.split(',')
    if set(models) - set(MODELS): p.error(f"--models: one or more of {', '.join(MODELS)}")
    torch.set_num_threads(a.threads)
    classes = read_classes(Path(a.train).parent)
    test = EMFolder(a.test, masks=True)
    runs, t0 = [], time.time()
    for seed in [int(s) for s in a.seeds.split(',')]:
        for name in models:
            torch.manual_seed(seed)
            dls = segment_dls(a.train, size=a.size, bs=a.bs, valid_pct=0.05, seed=seed, device='cpu', codes=classes)
            label_subset(dls, a.frac, seed)
            dls.train.dataset.n = dls.train.n = a.bs * a.steps           # one epoch of `steps` batches
            model = MODELS[name](len(classes))
            learn = seg_learner(dls, model, classes=classes, per_class=False, capture=False, mixed_precision=None,
                                aux_weight=AUX_WEIGHTS.get(name, 0.))
            t = time.time()
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, a.lr)
            train_s = time.time() - t
            sc = evaluate_model(model.eval(), test, dict(classes=classes, stats=dls.stats, tile=512), bs=2)
            runs.append(dict(model=name, seed=seed, params=sum(q.numel() for q in model.parameters()), steps=a.steps,
                             n_labelled=len(dls.train.dataset.idxs), train_s=round(train_s, 1), miou=sc['miou'],
                             fg_iou=sc['fg_miou'], per_class=sc['per_class']))
            print(f"[{time.time() - t0:6.0f}s] seed {seed} {name:>10}: mIoU {sc['miou']:.3f}, "
                  f"{classes[-1]} IoU {sc['per_class'][classes[-1]]['iou']:.3f} ({train_s:.0f} s training)", flush=True)
            del learn, model
    res = dict(device=f'cpu, {a.threads} threads', torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), args=vars(a),
               classes=list(classes), runs=runs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print('wrote', a.out)
