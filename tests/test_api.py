"""`affmae.load`: pretraining and segmentation checkpoints on the CPU, the `reconstruct` command on top of it, bad
files."""
import subprocess, sys
import numpy as np, pytest, torch
import affmae
from affmae.registry import create_model
from affmae.checkpoint import save_checkpoint
from affmae.synth import synth_em
from affmae.mae import patchify


@pytest.fixture
def img(): return synth_em((70, 90), seed=1)[0].numpy() * 255


def _mae(tmp_path, arch='affmae_tiny', stats=(0.5, 0.25)):
    (tmp_path / 'run').mkdir(exist_ok=True)
    m = create_model(arch)
    save_checkpoint(m, tmp_path / 'run' / 'epoch_000.safetensors', stats=stats)
    save_checkpoint(m, tmp_path / 'run' / 'epoch_001.safetensors', stats=stats)
    return m


def test_import_stays_light():
    code = "import sys, affmae; assert callable(affmae.load); assert 'fastai' not in sys.modules"
    subprocess.run([sys.executable, '-c', code], check=True)


def test_pretraining(tmp_path, img):
    mae = _mae(tmp_path)
    (tmp_path / 'run' / 'epoch_002.safetensors').write_bytes(b'torn')          # the newest is unreadable: skipped
    m = affmae.load(tmp_path / 'run', 'cpu')
    assert (m.kind, m.arch, m.path.name, m.stats) == ('pretraining', 'affmae_tiny', 'epoch_001.safetensors', [.5, .25])
    assert not m.model.training
    r = m.reconstruct(torch.from_numpy(img)[None])
    assert r['img'].shape == (1, 1, 64, 88) and len(r['recons']) == len(mae.loss_weights)
    vis = ~r['mask'].flatten(1)
    assert torch.equal(patchify(r['recons'][-1], 8)[vis], patchify(r['img'], 8)[vis])
    n = [int(t.valid.sum()) for t in m.tokens(img)]
    assert len(n) == len(mae.encoder.dims) and n[0] == int(vis.sum()) and n == sorted(n, reverse=True)
    with pytest.raises(ValueError, match='is a pretraining checkpoint of affmae_tiny: segment needs a segmentation'):
        m.segment(img)


def test_segmentation(tmp_path, img):
    save_checkpoint(create_model('affmae_tiny', 'segmentation', n_classes=2), tmp_path / 'seg.safetensors',
                    ['bg', 'cell'], stats=[0.5, 0.25], tile=32)
    s = affmae.load(tmp_path, 'cpu')                                              # a run folder: its seg.safetensors
    lbl, pr = s.segment(img, probs=True)
    assert s.classes == ['bg', 'cell'] and lbl.shape == (70, 90) and pr.shape == (2, 70, 90) and lbl.max() < 2
    assert np.array_equal(s.segment(img), lbl)
    import tifffile
    tifffile.imwrite(tmp_path / 'img.tif', img.astype(np.float32))
    for path in (tmp_path / 'img.tif', str(tmp_path / 'img.tif')):                # a file's path reads its plane
        assert np.array_equal(s.segment(path), lbl)
    for f in (s.reconstruct, s.figure):
        with pytest.raises(ValueError, match='segmentation checkpoint of affmae_tiny: reconstruct needs a pretraining'):
            f(img)


def test_recorded_prep(tmp_path, img):
    """A checkpoint's CLAHE clip and full range (`pct` None): 8- and 16-bit images are equalised in their own type
    first, as `prep_plane` and `predict_plane` do it, and labelled differently than without the clip."""
    from affmae.inference import predict_plane, prep_plane
    from affmae.prep import CLAHE_CLIP, FINETUNE_CLAHE_CLIP, PAPER_STATS
    u8 = img.clip(0, 255).astype(np.uint8)
    save_checkpoint(create_model('affmae_tiny'), tmp_path / 'mae.safetensors', stats=PAPER_STATS, clahe=CLAHE_CLIP,
                    pct=None)
    m = affmae.load(tmp_path / 'mae.safetensors', 'cpu')
    assert torch.equal(m.normalise(torch.from_numpy(u8)[None]), prep_plane(u8, PAPER_STATS, None, CLAHE_CLIP))
    assert m.reconstruct(u8, size=48)['img'].shape == (1, 1, 48, 48)
    seg = create_model('affmae_tiny', 'segmentation', n_classes=2)
    for name, clip in (('paper', FINETUNE_CLAHE_CLIP), ('plain', None)):
        save_checkpoint(seg, tmp_path / name / 'seg.safetensors', ['bg', 'cell'], stats=PAPER_STATS, tile=32,
                        clahe=clip, pct=None)
    s, plain = affmae.load(tmp_path / 'paper', 'cpu'), affmae.load(tmp_path / 'plain', 'cpu')
    for a in (u8, u8.astype(np.uint16) * 200):
        assert np.array_equal(s.segment(a), predict_plane(s.model, a, s.meta))
        assert not np.array_equal(s.segment(a), plain.segment(a))


def test_recorded_resize(tmp_path, img):
    """A checkpoint's `resize` reads back through `recorded_prep` (None for one without it); `predict_plane` and
    `.segment` run the resized image and give labels and probabilities at the image's own, non-square shape."""
    from affmae.checkpoint import read_meta, recorded_prep
    from affmae.inference import predict_plane
    seg, a = create_model('affmae_tiny', 'segmentation', n_classes=2), img[:40, :56]
    for name, rs in (('rs', 48), ('native', None)):
        save_checkpoint(seg, tmp_path / name / 'seg.safetensors', ['bg', 'cell'], stats=[.5, .25], tile=32, resize=rs)
        assert recorded_prep(read_meta(tmp_path / name / 'seg.safetensors'))['resize'] == rs
    assert recorded_prep(dict(stats=[.5, .25]))['resize'] is None                    # an older checkpoint: native
    s, native = affmae.load(tmp_path / 'rs', 'cpu'), affmae.load(tmp_path / 'native', 'cpu')
    lbl, pr = s.segment(a, probs=True)
    assert s.normalise(a).shape == (1, 1, 48, 48) and lbl.shape == (40, 56) and pr.shape == (2, 40, 56)
    assert np.array_equal(lbl, predict_plane(s.model, a, s.meta)) and np.allclose(pr.sum(0), 1, atol=1e-4)
    assert not np.allclose(pr, native.segment(a, probs=True)[1], atol=1e-4)


def test_reconstruct_command(tmp_path, img):
    from PIL import Image
    from affmae.cli import main
    _mae(tmp_path, 'vitmae_tiny')
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / 'img.png')
    assert main(['reconstruct', str(tmp_path / 'run'), str(tmp_path / 'img.png'), '--out', str(tmp_path / 'r.png'),
                 '--size', '48']) == 0
    assert (tmp_path / 'r.png').stat().st_size > 1000
    with pytest.raises(ValueError, match='vitmae_tiny has no AFF encoder'): affmae.load(tmp_path / 'run').tokens(img)


def test_bad_paths_and_files(tmp_path):
    from safetensors.torch import save_file
    mae = _mae(tmp_path)
    b = (tmp_path / 'run' / 'epoch_000.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(b[:len(b) // 2])
    torch.save({'model': mae.state_dict(), 'epoch': 3}, tmp_path / 'old.pth')
    save_file({'w': torch.zeros(2)}, tmp_path / 'bare.safetensors')
    (tmp_path / 'empty').mkdir()
    for p, exc, msg in ((tmp_path / 'nothing', FileNotFoundError, 'nothing: no such checkpoint file or folder'),
                        (tmp_path / 'empty', FileNotFoundError, 'no readable checkpoint in .*empty'),
                        (tmp_path / 'cut.safetensors', ValueError, 'cut.safetensors: not a readable safetensors file'),
                        (tmp_path / 'old.pth', ValueError, r'old.pth: a \.pth file is not an affmae checkpoint'),
                        (tmp_path / 'bare.safetensors', ValueError, 'bare.safetensors has no affmae metadata')):
        with pytest.raises(exc, match=msg) as e: affmae.load(p)
        assert '\n' not in str(e.value)


def test_old_format_converted(tmp_path, img):
    """Checkpoints in the layouts earlier versions wrote (pretraining: one JSON value per key; fine-tuning:
    `affmae_seg`)."""
    import json
    from safetensors.torch import save_file
    mae = create_model('affmae_tiny')
    meta = dict(arch='affmae_tiny', model_kw={}, config_hash='0', epoch=4, stats=[.5, .25], run_id='r')
    save_file(dict(mae.state_dict()), tmp_path / 'old_mae.safetensors', {k: json.dumps(v) for k, v in meta.items()})
    m = affmae.load(tmp_path / 'old_mae.safetensors', 'cpu')
    assert (m.kind, m.arch, m.stats, m.meta['epoch']) == ('pretraining', 'affmae_tiny', [.5, .25], 4)
    seg = create_model('unet', n_classes=2, width=4)
    rec = dict(arch='unet', arch_kw=dict(width=4), classes=['bg', 'cell'], tile=32, stats=[.5, .25])
    save_file(dict(seg.state_dict()), tmp_path / 'old_seg.safetensors', {'affmae_seg': json.dumps(rec)})
    s = affmae.load(tmp_path / 'old_seg.safetensors', 'cpu')
    assert (s.kind, s.classes, s.meta['config']) == ('segmentation', ['bg', 'cell'], dict(width=4, n_classes=2))
    assert s.segment(img).shape == (70, 90)
