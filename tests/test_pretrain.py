"""MAE pretraining end to end (issue 6): learning, per-stage losses, masked-only loss, exact resume, CLI errors. CPU,
tiny configs."""
import subprocess, sys, random
import numpy as np, pytest, torch
from fastai.callback.core import Callback, CancelFitException
from affmae import create_model
from affmae.synth import synth_em
from affmae.data import pretrain_dls
from affmae.mae import patch_targets, masked_mse
from affmae.learner import mae_learner, Checkpoint
from affmae.cli import main

ARCHS = ['affmae_tiny', 'vitmae_tiny']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)   # tiny ops: threads only add overhead on a shared CPU
    yield
    torch.set_num_threads(n)


def em_batch(n=4, size=32):
    x = torch.stack([synth_em(size, seed=i)[0] for i in range(n)])[:, None]
    return (x - x.mean()) / x.std()


@pytest.mark.parametrize('arch', ARCHS)
def test_loss_halves_within_200_steps(arch):
    """Total loss and the final head's loss both fall >= 50 %, the final head's below half the trivial
    (predict-the-patch-mean) loss."""
    torch.manual_seed(0)
    img, m = em_batch(), create_model(arch)
    mask = m.make_mask(img)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=.05)
    # predict the mean
    trivial = masked_mse(torch.zeros(4, 16, 64), patch_targets(img, norm_pix=m.norm_pix), mask.flatten(1)).item()
    for step in range(200):
        out = m(img, mask)
        opt.zero_grad(); out['loss'].backward(); opt.step()
        if step == 0: first, first_final = out['loss'].item(), out['losses'][-1].item()
        if out['loss'].item() < .5 * first and out['losses'][-1].item() < .5 * min(first_final, trivial): break
    assert out['loss'].item() < .5 * first, (arch, step, first, out['loss'].item())
    assert out['losses'][-1].item() < .5 * min(first_final, trivial), (arch, step, first, out['loss'].item())


@pytest.mark.parametrize('arch,n', [('affmae_tiny', 4), ('vitmae_tiny', 1)])
def test_output_contract_and_stage_losses(arch, n):
    torch.manual_seed(0)
    m, img = create_model(arch), em_batch(2, 32)
    out = m(img)
    assert set(out) == {'loss', 'losses', 'pred', 'mask'}
    assert len(out['losses']) == n and all(l.ndim == 0 for l in out['losses'])
    assert out['pred'].shape == (2, 16, 64) and out['mask'].dtype == torch.bool and out['mask'].shape == (2, 16)
    assert out['mask'].sum(1).tolist() == [8, 8]                      # ratio 0.5
    torch.testing.assert_close(out['loss'], sum(w * l for w, l in zip(m.loss_weights, out['losses'])))
    r = m.reconstruct(img)
    assert len(r['recons']) == n and r['recons'][-1].shape == img.shape


@pytest.mark.parametrize('arch', ARCHS)
def test_only_masked_patches_contribute(arch):
    torch.manual_seed(0)
    m, img = create_model(arch).eval(), em_batch(2, 32)
    mask = m.make_mask(img)
    pix = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    out = m(img, mask)
    # the loss of a fixed prediction ignores visible targets
    tgt = patch_targets(img)
    tgt2 = torch.where(mask.flatten(1)[..., None], tgt, torch.randn_like(tgt))
    assert masked_mse(out['pred'], tgt, out['mask']) == masked_mse(out['pred'], tgt2, out['mask'])
    # and the model never sees masked pixels: new masked pixels change predictions of no patch
    torch.testing.assert_close(m(torch.where(pix, torch.randn_like(img), img), mask)['pred'], out['pred'],
                               rtol=1e-5, atol=1e-5)


class _Log(Callback):
    def before_fit(self): self.losses = []
    def after_batch(self):
        if self.training: self.losses.append((self.epoch, self.loss.item()))


class _Kill(Callback):
    order = Checkpoint.order + 1
    def after_epoch(self):
        if self.epoch == 1: raise CancelFitException()


@pytest.mark.parametrize('arch', ARCHS)
def test_checkpoint_kill_resume_same_next_losses(arch, tmp_path):
    def run(ckpt, cbs, seed=0, resume=None):
        torch.manual_seed(seed); random.seed(seed); np.random.seed(seed)
        log = _Log()
        learn = mae_learner(pretrain_dls('synthetic', size=32, bs=4, n_synth=8, device='cpu'), arch, lr=2e-3, accum=2,
                            ckpt_dir=ckpt, cbs=[log] + cbs)
        start = learn.load_checkpoint(resume) if resume else 0
        learn.fit_one_cycle(3, pct_start=.25, start_epoch=start)
        return log.losses
    full = run(tmp_path / 'full', [])
    run(tmp_path / 'killed', [_Kill()])
    resumed = run(tmp_path / 'resumed', [], seed=99, resume=tmp_path / 'killed')
    assert resumed and resumed == [l for l in full if l[0] == 2]


def _cli(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    from PIL import Image
    rc, err = _cli(['pretrain', '--ratio', '1.0'], capsys)
    assert rc == 2 and '--ratio must be in (0, 1)' in err
    rc, err = _cli(['pretrain', '--ratio', '0'], capsys)
    assert rc == 2 and '--ratio must be in (0, 1)' in err
    rc, err = _cli(['pretrain', '--data', str(tmp_path / 'missing')], capsys)
    assert rc == 2 and 'no such directory' in err
    (tmp_path / 'small').mkdir()
    Image.fromarray((np.random.rand(40, 40) * 255).astype(np.uint8)).save(tmp_path / 'small' / 'a.png')
    rc, err = _cli(['pretrain', '--data', str(tmp_path / 'small'), '--img-size', '64'], capsys)
    assert rc == 2 and 'smaller than the crop size 64' in err
    rc, err = _cli(['pretrain', '--arch', 'resnet50'], capsys)
    assert rc == 2 and 'is not a pretraining model' in err
    rc, err = _cli(['nope'], capsys)
    assert rc == 2 and 'unknown command' in err


def test_console_script_exit_status():
    r = subprocess.run([sys.executable, '-c', 'import sys; from affmae.cli import main; sys.exit(main())',
                        'pretrain', '--ratio', '1.5'], capture_output=True, text=True)
    assert r.returncode == 2 and '--ratio must be in (0, 1), got 1.5' in r.stderr


def test_gradients_reach_every_parameter():
    "One backward of affmae_tiny reaches every parameter, the decoder's distance-bias reaches included."
    torch.manual_seed(0)
    m = create_model('affmae_tiny')
    m(em_batch(2, 64))['loss'].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not (p.grad.abs().sum() > 0)]
    assert not dead, dead
    assert all(l.reach_cross.grad.abs().sum() > 0 and l.reach_self.grad.abs().sum() > 0 for l in m.decoder.layers)
