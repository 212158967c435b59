"""Pretraining on HOG targets (`affmae.hog`, `MAEBase(target='hog')`): it learns, it runs through the command line
(pretrain, reconstruct, fine-tune from it), and the levels to beat follow the target. CPU, tiny configs."""
import warnings
import pytest, torch
import affmae
from affmae import create_model
from affmae.synth import synth_em
from affmae.mae import masked_mse
from affmae.hog import hog_targets, hog_dim
from affmae.real_em import recon_levels, blur_inpaint
from affmae.cli import main


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def em_batch(n=4, size=32):
    x = torch.stack([synth_em(size, seed=i)[0] for i in range(n)])[:, None]
    return (x - x.mean()) / x.std()


@pytest.mark.parametrize('arch', ['affmae_tiny', 'vitmae_tiny'])
def test_hog_target_learns(arch):
    "On a fixed batch and mask the final head's HOG loss falls below 0.7 x the trivial level (the mean histogram's)."
    torch.manual_seed(0)
    img, m = em_batch(), create_model(arch, target='hog')
    assert m.target_dim == hog_dim(1) and m(img)['pred'].shape == (4, 16, 9)
    mask = m.make_mask(img)
    tgt, hidden = hog_targets(img), mask.flatten(1)
    trivial = masked_mse(tgt[hidden].mean(0).expand_as(tgt), tgt, hidden).item()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=.05)
    for step in range(200):
        out = m(img, mask)
        opt.zero_grad(); out['loss'].backward(); opt.step()
        if out['losses'][-1].item() < .7 * trivial: break
    assert out['losses'][-1].item() < .7 * trivial, (arch, step, trivial, out['losses'][-1].item())


def test_levels_follow_the_target():
    "`recon_levels` of a HOG model: trivial = the batch's mean histogram's masked MSE, and the blurs scored as HOG."
    torch.manual_seed(0)
    img, m = em_batch(4, 64), create_model('affmae_tiny', target='hog')
    lv = recon_levels(m, [(img,)], sigmas=(1, 4), seed=3)
    mask = m.make_mask(img, generator=torch.Generator().manual_seed(3)).flatten(1)
    tgt = hog_targets(img)
    torch.testing.assert_close(lv['trivial'], masked_mse(tgt.mean((0, 1)).expand_as(tgt), tgt, mask).item())
    vis = (~mask).view(4, 1, 8, 8).float().repeat_interleave(8, -2).repeat_interleave(8, -1)
    torch.testing.assert_close(lv['blur'][4], masked_mse(hog_targets(blur_inpaint(img, vis, 4)), tgt, mask).item())
    assert lv['floor'] == min(lv['blur'].values()) and set(lv['blur']) == {1, 4}


def test_cli_pretrain_reconstruct_finetune(tmp_path, capsys):
    tiny = ['--arch', 'affmae_tiny', '--img-size', '32', '--bs', '4', '--n-synth', '4', '--epochs', '1']
    assert main(['pretrain', *tiny, '--target', 'edges']) == 2
    assert '--target must be one of pixels, hog' in capsys.readouterr().err
    assert main(['pretrain', *tiny, '--target', 'hog', '--norm-pix']) == 2
    assert 'it needs --target pixels' in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(['pretrain', *tiny, '--data', 'synthetic', '--target', 'hog', '--precision', 'none',
                     '--out', str(tmp_path / 'pre')]) == 0
        pre = affmae.load(tmp_path / 'pre' / 'checkpoints', 'cpu')
        assert pre.model.target == 'hog' and pre.model.decoder.heads[-1][1].out_features == 9
        assert (tmp_path / 'pre' / 'figures' / 'recon_000.png').stat().st_size > 1000
        from PIL import Image
        Image.fromarray((synth_em(64, seed=5)[0].numpy() * 255).astype('uint8')).save(tmp_path / 'img.png')
        assert main(['reconstruct', str(tmp_path / 'pre' / 'checkpoints'), str(tmp_path / 'img.png'),
                     '--out', str(tmp_path / 'r.png'), '--size', '48']) == 0
        assert (tmp_path / 'r.png').stat().st_size > 1000
        assert main(['finetune', *tiny, '--pretrained', str(tmp_path / 'pre' / 'checkpoints'),
                     '--out', str(tmp_path / 'ft')]) == 0
    assert 'loaded' in capsys.readouterr().out


def test_image_path_needs_pixels():
    with pytest.raises(ValueError, match="the image path predicts pixels: it needs target='pixels'"):
        create_model('affmae_tiny', image_path=True, target='hog')
