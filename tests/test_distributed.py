"""Data-parallel training on the CPU (gloo): two processes' averaged gradient equals one process's gradient of the
same global batch; a two-process `affmae pretrain` writes one checkpoint, which one process resumes; a two-process
`affmae finetune` writes its outputs once. Run by pytest; `torchrun ... tests/test_distributed.py OUT` is the
two-process half."""
import os, socket, subprocess, sys
from pathlib import Path
import pytest, torch
from fastai.callback.core import Callback, CancelFitException
from affmae.learner import Accumulate

ARGS = ['--data', 'synthetic', '--arch', 'affmae_tiny', '--img-size', '32', '--bs', '2', '--n-synth', '8',
        '--precision', 'none', '--ckpt-every', '1', '--eff-bs', '8']


class ContentMasks(Callback):
    "Masks drawn from each image's own content: the same in any batch, on any rank."
    order = 1
    def before_batch(self):
        if not self.training: return
        x = self.xb[0]
        gens = [torch.Generator().manual_seed(int(v.abs().sum().item() * 1e3) % 2**31) for v in x]
        self.learn.xb = (x, torch.cat([self.model.make_mask(v[None], g) for v, g in zip(x, gens)]))


class StepGrads(Callback):
    "Keep the gradients the optimiser would step with (after `Accumulate`), then stop."
    order = Accumulate.order + 1
    def before_step(self):
        model = getattr(self.model, 'module', self.model)             # under DDP: the model it wraps
        self.learn.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        raise CancelFitException()


def first_step_grads(bs: int, accum: int) -> dict:
    "Gradients of the first optimiser step of a tiny MAE on 4 synthetic images, `bs` per process, `accum` batches."
    from fastai.torch_core import set_seed
    from affmae.data import pretrain_dls
    from affmae.learner import mae_learner
    from affmae.distributed import data_parallel
    set_seed(0)
    dls = pretrain_dls('synthetic', size=32, bs=bs, n_synth=4, valid_pct=0, device='cpu')
    dls.train.after_batch.augment = False
    learn = mae_learner(dls, 'affmae_tiny', accum=accum, clip=None, precision=None, valid_seed=None, capture=False,
                        cbs=[ContentMasks(), StepGrads()])
    data_parallel(learn)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn.grads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_procs(tmp_path_factory):
    "This file under torchrun, two gloo processes: first-step gradients, a one-epoch pretrain, a finetune."
    out = tmp_path_factory.mktemp('ddp')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                                             os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           __file__, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out, r.stdout


def test_averaged_gradient_equals_one_process(two_procs):
    out, _ = two_procs
    ddp = torch.load(out / 'grads.pt')
    torch.set_num_threads(1)
    one = first_step_grads(bs=4, accum=1)                     # the same 4 images in one batch, one process
    assert ddp.keys() == one.keys()
    for n in one: torch.testing.assert_close(ddp[n], one[n], rtol=1e-4, atol=1e-6, msg=n)


def test_one_checkpoint_then_resume_on_one_process(two_procs):
    out, log = two_procs
    ck = out / 'run' / 'checkpoints'
    assert sorted(p.name for p in ck.iterdir()) == ['epoch_000.safetensors', 'epoch_000.state.safetensors']
    assert log.count('batch 2 per process x accumulation 2 = effective batch 8') == 1    # rank 0's line alone
    from affmae.cli import main
    assert main(['pretrain', *ARGS, '--epochs', '2', '--out', str(out / 'run'), '--resume', str(ck)]) == 0
    assert (ck / 'epoch_001.safetensors').is_file()                # one process, --accum 4: the same effective batch


def test_finetune_outputs_written_once(two_procs):
    out, log = two_procs
    assert sorted(p.name for p in (out / 'finetune').iterdir()) == ['history.json', 'results.png', 'seg.safetensors']
    assert log.count('wrote ') == 1


def test_eff_bs_must_be_reachable(tmp_path, capsys):
    from affmae.cli import main
    assert main(['pretrain', *ARGS[:-2], '--eff-bs', '5', '--epochs', '1', '--out', str(tmp_path)]) == 2
    assert '--eff-bs 5 is not a positive multiple of --bs 2 x 1 process(es) = 2' in capsys.readouterr().err


if __name__ == '__main__':                                 # one of the two torchrun processes
    from affmae.cli import main
    from affmae.distributed import init_distributed
    torch.set_num_threads(1)
    out, rank = Path(sys.argv[1]), init_distributed('gloo')
    grads = first_step_grads(bs=1, accum=2)                # 2 processes x batch 1 x 2 accumulated = 4 images
    if rank == 0: torch.save(grads, out / 'grads.pt')
    status = main(['pretrain', *ARGS, '--epochs', '1', '--out', str(out / 'run')])
    sys.exit(status or main(['finetune', '--arch', 'affmae_tiny', '--img-size', '32', '--bs', '2', '--n-synth', '8',
                             '--epochs', '1', '--out', str(out / 'finetune')]))
