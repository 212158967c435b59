"""Step time through fastai's loop beside the captured step alone: pretraining (`mae_learner`, as `affmae pretrain`
builds it) or fine-tuning (`seg_learner`, as `affmae finetune` does; `--task finetune`, from `--data` or synthetic EM).

The first epoch warms up and captures the step; the second is timed batch to batch (data loading, callbacks, the
replayed step and fastai's per-batch loss read included): the median interval is the step time a user sees.
`--lag-loss 0` makes `CaptureStep` hand fastai each step's own loss (a host sync per step) instead of the previous
step's (the default): run both to see what the sync costs.

    python kernels/fastai_loop.py --out $OUT/fastai_loop.json      # on the GPU machine, about a minute
    python kernels/fastai_loop.py --task finetune --archs affmae_base,unet --bs 8 --data data_em_a/drosophila-vnc
    python kernels/fastai_loop.py --task finetune --archs unet --size 64 --bs 4 --steps 6 --device cpu   # CPU check
    python kernels/fastai_loop.py --task finetune --archs affmae_base --bs 8 --lag-loss 0 --out $OUT/no_lag.json
"""
import argparse, json, statistics, time
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from affmae.data import pretrain_dls, segment_dls
from affmae.learner import mae_learner
from affmae.finetune import seg_learner
from affmae.graphs import CaptureStep

p = argparse.ArgumentParser()
p.add_argument('--task', default='pretrain', choices=('pretrain', 'finetune'))
p.add_argument('--archs', default='affmae_base,vitmae_base')
p.add_argument('--data', default=None, help='finetune: a folder of images/ and masks/ (default: synthetic EM)')
p.add_argument('--size', type=int, default=256)
p.add_argument('--bs', type=int, default=16)
p.add_argument('--steps', type=int, default=40, help='training steps per epoch')
p.add_argument('--workers', type=int, default=4)
p.add_argument('--capture', type=int, default=1)
p.add_argument('--lag-loss', type=int, default=1, help="CaptureStep's lag_loss: 1 the previous step's loss, 0 its own")
p.add_argument('--device', default='cuda')
p.add_argument('--augment', default='flips', help="finetune: the crops' augmentation (none, flips, full)")
p.add_argument('--class-weights', default='', help="finetune: the loss's class weights, comma-separated ('': none)")
p.add_argument('--out', default=None)
a = p.parse_args()


class BatchClock(Callback):
    "Host time at the start of every training batch of the last epoch."
    order = -30
    def before_fit(self): self.t = []
    def before_batch(self):
        if self.training and self.epoch == self.n_epoch - 1: self.t.append(time.perf_counter())


def learner(arch, clock):
    "The Learner a user's command builds for `arch`, one epoch `a.steps` batches long."
    if a.task == 'pretrain':
        dls = pretrain_dls(size=a.size, bs=a.bs, n_synth=64, epoch_len=a.bs * a.steps, num_workers=a.workers,
                           device=a.device)
        return mae_learner(dls, arch, lr=1e-4, capture=bool(a.capture), cbs=[clock])
    dls = segment_dls(a.data, size=a.size, bs=a.bs, n_synth=16, valid_pct=0.2, num_workers=a.workers,
                      device=a.device, epoch_len=a.bs * a.steps, augment=a.augment)
    weights = tuple(map(float, a.class_weights.split(','))) if a.class_weights else None
    return seg_learner(dls, arch, capture=bool(a.capture), cbs=[clock], per_class=False, loss_kw=dict(weight=weights))


def loader_ms(dl):
    "Median host interval between batches of `dl` alone (workers, collation, transfer, batch transforms)."
    t = []
    for _ in dl: t.append(time.perf_counter())
    if gpu: torch.cuda.synchronize()
    return statistics.median(1e3 * (y - x) for x, y in zip(t, t[1:]))


gpu = a.device == 'cuda'
res = dict(device=torch.cuda.get_device_name() if gpu else 'cpu', torch=torch.__version__, task=a.task, data=a.data,
           size=a.size, bs=a.bs, workers=a.workers, capture=bool(a.capture), lag_loss=bool(a.lag_loss),
           augment=a.augment, class_weights=a.class_weights, records=[])
for arch in a.archs.split(','):
    set_seed(0)
    clock = BatchClock()
    learn = learner(arch, clock)
    for cb in learn.cbs.filter(lambda c: isinstance(c, CaptureStep)): cb.lag_loss = bool(a.lag_loss)
    learn.fit_one_cycle(2, 1e-4, moms=(.9, .9, .9))
    dt = [1e3 * (y - x) for x, y in zip(clock.t, clock.t[1:])]
    r = dict(arch=arch, step_ms=statistics.median(dt), loader_ms=loader_ms(learn.dls.train),
             intervals_ms=[round(x, 2) for x in dt])
    res['records'].append(r)
    print(f"{arch:>12}: fastai loop {r['step_ms']:.1f} ms/step, its loader alone {r['loader_ms']:.1f} ms/batch, "
          f"{a.task} at {a.size}² batch {a.bs}", flush=True)
    del learn
    if gpu: torch.cuda.empty_cache()
if a.out: open(a.out, 'w').write(json.dumps(res, indent=1))
