"""Step time of pretraining through fastai's loop (`mae_learner`, as `affmae pretrain` builds it), beside `affmae bench`.

The first epoch warms up and captures the step; the second is timed batch to batch (data loading, callbacks, the
replayed step and fastai's per-batch loss read included): the median interval is the step time a user sees.

    python kernels/fastai_loop.py --out $OUT/fastai_loop.json      # on the GPU machine, about a minute
"""
import argparse, json, statistics, time
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from affmae.data import pretrain_dls
from affmae.learner import mae_learner

p = argparse.ArgumentParser()
p.add_argument('--archs', default='affmae_base,vitmae_base')
p.add_argument('--size', type=int, default=256)
p.add_argument('--bs', type=int, default=16)
p.add_argument('--steps', type=int, default=40, help='training steps per epoch')
p.add_argument('--workers', type=int, default=4)
p.add_argument('--capture', type=int, default=1)
p.add_argument('--out', default=None)
a = p.parse_args()


class BatchClock(Callback):
    "Host time at the start of every training batch of the last epoch."
    order = -30
    def before_fit(self): self.t = []
    def before_batch(self):
        if self.training and self.epoch == self.n_epoch - 1: self.t.append(time.perf_counter())


res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, size=a.size, bs=a.bs, workers=a.workers,
           capture=bool(a.capture), records=[])
for arch in a.archs.split(','):
    set_seed(0)
    dls = pretrain_dls(size=a.size, bs=a.bs, n_synth=64, epoch_len=a.bs * a.steps, num_workers=a.workers,
                       device='cuda')
    clock = BatchClock()
    learn = mae_learner(dls, arch, lr=1e-4, capture=bool(a.capture), cbs=[clock])
    learn.fit_one_cycle(2, moms=(.9, .9, .9))
    dt = [1e3 * (y - x) for x, y in zip(clock.t, clock.t[1:])]
    r = dict(arch=arch, step_ms=statistics.median(dt), intervals_ms=[round(x, 2) for x in dt])
    res['records'].append(r)
    print(f"{arch:>12}: fastai loop {r['step_ms']:.1f} ms/step at {a.size}² batch {a.bs}", flush=True)
    del learn, dls; torch.cuda.empty_cache()
if a.out: open(a.out, 'w').write(json.dumps(res, indent=1))
