"Issue 12: nothing lost, nothing executed, nothing silently wrong. One CPU test per defect, tiny configs."
import json, os, pickle, random, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from fastai.callback.core import Callback, CancelFitException
from safetensors.torch import load_file
import affmae.learner as L
from affmae.data import pretrain_dls
from affmae.learner import mae_learner, Checkpoint, state_path
from affmae.checkpoint import latest_checkpoint, checkpoints
from affmae.cli import main


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(capsys, *args):
    "Exit status and stderr of `affmae args`; user errors must be one line."
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    if rc: assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    return rc, err


class _Log(Callback):
    def before_fit(self): self.losses = []
    def after_batch(self):
        if self.training: self.losses.append((self.epoch, self.loss.item()))


class _KillAfter(Callback):
    order = Checkpoint.order + 1
    def __init__(self, epoch): self.at = epoch
    def after_epoch(self):
        if self.epoch == self.at: raise CancelFitException()


def run(ckpt, cbs=(), seed=0, resume=None, arch='vitmae_tiny'):
    torch.manual_seed(seed); random.seed(seed); np.random.seed(seed)
    log = _Log()
    dls = pretrain_dls(size=32, bs=4, n_synth=8, device='cpu')
    learn = mae_learner(dls, arch, lr=2e-3, ckpt_dir=ckpt, cbs=[log, *cbs])
    start = learn.load_checkpoint(resume) if resume else 0
    learn.fit_one_cycle(3, pct_start=.25, start_epoch=start)
    return log.losses, learn


def test_kill_during_save_then_resume(tmp_path, monkeypatch, capsys):
    "A save killed before its rename leaves no file under a checkpoint's name; an old 0-byte file is skipped."
    full, _ = run(tmp_path / 'full')
    real = os.replace
    def die(src, dst):
        if Path(dst).name == 'epoch_002.safetensors': raise KeyboardInterrupt   # killed between writing and renaming
        real(src, dst)
    monkeypatch.setattr(os, 'replace', die)
    with pytest.raises(KeyboardInterrupt): run(tmp_path / 'k')
    monkeypatch.setattr(os, 'replace', real)
    assert not (tmp_path / 'k' / 'epoch_002.safetensors').exists() and not list((tmp_path / 'k').glob('.*tmp'))
    (tmp_path / 'k' / 'epoch_002.safetensors').write_bytes(b'')                     # what a non-atomic write left
    capsys.readouterr()
    resumed, _ = run(tmp_path / 'r', seed=7, resume=tmp_path / 'k')
    out = capsys.readouterr().out
    assert 'epoch_002.safetensors' in out and 'resuming from epoch_001.safetensors' in out, out
    assert resumed == [l for l in full if l[0] == 2]


def test_crafted_pickle_never_executed(tmp_path, capsys):
    "A folder whose newest 'checkpoint' is a pickle that would create a file: resume skips it and runs nothing."
    run(tmp_path / 'ck', [_KillAfter(1)])
    marker = tmp_path / 'pwned'
    class Evil:
        def __reduce__(self): return (open, (str(marker), 'w'))
    for name in ('epoch_002.safetensors', 'epoch_002.state.safetensors', 'epoch_002.pth', 'epoch_001.pth'):
        torch.save({'epoch': 2, 'opt': Evil()}, tmp_path / 'ck' / name)
    pickle.loads(pickle.dumps(Evil())); assert marker.exists(); marker.unlink()        # the payload works
    _, learn = run(tmp_path / 'r', resume=tmp_path / 'ck')
    assert not marker.exists()
    torch.save({'model': Evil()}, tmp_path / 'evil.pth')                               # finetune --pretrained evil.pth
    assert cli(capsys, 'finetune', '--pretrained', tmp_path / 'evil.pth', '--arch', 'affmae_tiny', '--img-size', 32,
               '--epochs', 1, '--n-synth', 2, '--out', tmp_path / 'ft')[0] == 2
    assert not marker.exists()
    assert 'torch.load' not in Path(L.__file__).read_text()


def test_training_state_is_tensors_and_json(tmp_path):
    run(tmp_path / 'ck', [_KillAfter(0)])
    ts = load_file(str(state_path(tmp_path / 'ck' / 'epoch_000.safetensors')))
    assert 'rng.torch' in ts and any(k.startswith('opt.') for k in ts)
    assert sorted(p.name for p in (tmp_path / 'ck').iterdir()) == ['epoch_000.safetensors',
                                                                  'epoch_000.state.safetensors']


def test_resume_other_arch_one_line(tmp_path, capsys):
    run(tmp_path / 'ck', [_KillAfter(0)], arch='vitmae_tiny')
    with pytest.raises(ValueError, match=r'checkpoint of vitmae_tiny .* this run trains affmae_tiny'):
        run(tmp_path / 'r', resume=tmp_path / 'ck', arch='affmae_tiny')


PRE = ['pretrain', '--arch', 'vitmae_tiny', '--img-size', 32, '--bs', 4, '--n-synth', 4, '--precision', 'none']


def test_two_runs_into_one_folder(tmp_path, capsys):
    out = tmp_path / 'run'
    assert cli(capsys, *PRE, '--epochs', 3, '--out', out)[0] == 0
    rc, err = cli(capsys, *PRE, '--epochs', 1, '--out', out)
    assert rc == 2 and 'is not empty' in err and '--overwrite' in err
    assert cli(capsys, *PRE, '--epochs', 1, '--out', out, '--overwrite')[0] == 0     # the old run's epoch_002 is gone
    assert [p.name for p in checkpoints(out / 'checkpoints')] == ['epoch_000.safetensors']
    assert [p.name for p in (out / 'figures').iterdir()] == ['recon_000.png']
    # a folder mixing two runs is refused where a checkpoint is picked from it
    other = tmp_path / 'other'
    assert cli(capsys, *PRE, '--epochs', 2, '--out', other)[0] == 0
    name = 'checkpoints/epoch_001.safetensors'
    (out / name).write_bytes((other / name).read_bytes())
    with pytest.raises(ValueError, match='holds checkpoints of 2 runs'): latest_checkpoint(out / 'checkpoints')
    rc, err = cli(capsys, 'finetune', '--pretrained', out / 'checkpoints', '--arch', 'vitmae_tiny',
                  '--out', tmp_path / 'ft')
    assert rc == 2 and '2 runs' in err
    # resuming one run into another run's folder is refused
    first = out / 'checkpoints' / 'epoch_000.safetensors'
    rc, err = cli(capsys, *PRE, '--epochs', 3, '--out', other, '--resume', first)
    assert rc == 2 and 'another run' in err


def test_resume_epochs_and_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / 'run'
    assert cli(capsys, *PRE, '--epochs', 2, '--out', out)[0] == 0
    rc, err = cli(capsys, *PRE, '--epochs', 2, '--out', out, '--resume', out / 'checkpoints')
    assert rc == 2 and 'leaves nothing to train' in err
    ck = out / 'checkpoints' / 'epoch_001.safetensors'
    (tmp_path / 'trunc.safetensors').write_bytes(ck.read_bytes()[:300])
    (tmp_path / 'random.safetensors').write_bytes(np.random.default_rng(0).bytes(5000))
    from PIL import Image
    Image.fromarray((np.random.rand(48, 48) * 255).astype(np.uint8)).save(tmp_path / 'img.png')
    for bad in ('trunc', 'random'):
        f = tmp_path / f'{bad}.safetensors'
        for args in (['reconstruct', f, tmp_path / 'img.png', '--out', tmp_path / 'r.png'],
                     [*PRE, '--epochs', 3, '--out', tmp_path / 'x', '--resume', f],
                     ['finetune', '--pretrained', f, '--arch', 'vitmae_tiny', '--out', tmp_path / 'ft'],
                     ['predict', f, tmp_path / 'img.png', '--out', tmp_path / 'p'],
                     ['evaluate', f]):
            rc, err = cli(capsys, *args)
            assert rc == 2 and 'not a readable safetensors file' in err, (args, err)
    for args, msg in ((['predict', out / 'checkpoints', tmp_path / 'img.png'], 'not a segmentation one'),
                      (['evaluate', out], 'not a segmentation one'),         # folders: resolved, then refused
                      (['evaluate', out / 'figures'], 'no readable checkpoint in')):
        rc, err = cli(capsys, *args)
        assert rc == 2 and msg in err, err


# ---- segmentation: outputs, pretrained encoders, classes, arguments

from PIL import Image
import tifffile
from affmae.synth import synth_em


def _png(path, a): path.parent.mkdir(parents=True, exist_ok=True); Image.fromarray(a).save(path)
def _em(seed, size=48): return (synth_em(size, seed=seed)[0].numpy() * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def seg_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp('seg') / 'run'
    assert main(['finetune', '--arch', 'vitmae_tiny', '--img-size', '32', '--epochs', '1', '--bs', '4',
                 '--n-synth', '4', '--out', str(out)]) == 0
    return out / 'seg.safetensors'


def test_predict_names_never_collide(tmp_path, seg_ckpt, capsys):
    d = tmp_path / 'in'
    for rel in ('a.png', 'sub1/x.png', 'sub2/x.png', 'sub1/y.png'): _png(d / rel, _em(len(rel)))
    Image.fromarray(_em(9)).save(d / 'a.jpg')
    tifffile.imwrite(d / 'sub2' / 'y.tif', _em(3))
    assert cli(capsys, 'predict', seg_ckpt, d, '--out', tmp_path / 'p')[0] == 0
    labels = sorted(str(p.relative_to(tmp_path / 'p')) for p in (tmp_path / 'p').rglob('*_labels.tif'))
    assert labels == ['a_jpg_labels.tif', 'a_png_labels.tif', 'sub1/x_labels.tif', 'sub1/y_labels.tif',
                      'sub2/x_labels.tif', 'sub2/y_labels.tif']                  # 6 inputs, 6 outputs
    before = (tmp_path / 'p' / 'a_png_labels.tif').stat().st_mtime_ns
    rc, err = cli(capsys, 'predict', seg_ckpt, d / 'a.png', '--out', tmp_path / 'p2')
    assert rc == 0 and (tmp_path / 'p2' / 'a_labels.tif').exists()
    rc, err = cli(capsys, 'predict', seg_ckpt, d, '--out', tmp_path / 'p')             # a second run never overwrites
    assert rc == 2 and 'exists' in err and '--overwrite' in err
    assert (tmp_path / 'p' / 'a_png_labels.tif').stat().st_mtime_ns == before
    assert cli(capsys, 'predict', seg_ckpt, d, '--out', tmp_path / 'p', '--overwrite')[0] == 0
    (tmp_path / 'afile').write_text('x')
    rc, err = cli(capsys, 'predict', seg_ckpt, d / 'a.png', '--out', tmp_path / 'afile')
    assert rc == 2 and 'is a file' in err


def test_predict_read_only_out(tmp_path, seg_ckpt, capsys, monkeypatch):
    "A read-only --out (simulated: tests may run as root) is a one-line error before any work; so is a failing write."
    _png(tmp_path / 'a.png', _em(1))
    monkeypatch.setattr(os, 'access', lambda *a, **k: False)
    rc, err = cli(capsys, 'predict', seg_ckpt, tmp_path / 'a.png', '--out', tmp_path / 'ro')
    assert rc == 2 and 'is not writable' in err
    monkeypatch.undo()
    import affmae.finetune as S
    def refuse(lbl, path): raise PermissionError(13, 'Permission denied', str(path))
    monkeypatch.setattr(S, 'save_labels', refuse)
    rc, err = cli(capsys, 'predict', seg_ckpt, tmp_path / 'a.png', '--out', tmp_path / 'p')
    assert rc == 2 and 'Permission denied' in err


def test_mismatched_pretrained_encoder(tmp_path, capsys):
    out = tmp_path / 'pre'
    assert cli(capsys, *PRE[:2], 'affmae_tiny', *PRE[3:], '--epochs', 1, '--out', out)[0] == 0
    rc, err = cli(capsys, 'finetune', '--arch', 'affmae_small', '--pretrained', out / 'checkpoints',
                  '--out', tmp_path / 'ft')
    assert rc == 2 and 'checkpoint of affmae_tiny, but the model is affmae_small' in err
    from affmae.registry import create_model
    from affmae.seg_models import load_pretrained, backbone
    sd = {k: v for k, v in backbone('affmae_tiny').state_dict().items()}
    with pytest.raises(ValueError, match='lacks .* weights'):   # no arch
        load_pretrained(create_model('affmae_small', 'segmentation'), sd)


def test_finetune_argument_errors(tmp_path, capsys):
    base = ['finetune', '--arch', 'vitmae_tiny', '--out', tmp_path / 'ft']
    for args, msg in ((['--epochs', 0], '--epochs, --bs and --n-synth must be positive'),
                      (['--bs', 0], 'must be positive'),
                      (['--valid-pct', 0], '--valid-pct must be in (0, 1)'),
                      (['--img-size', 8], '--img-size must be at least 32'),
                      (['--arch', 'aff_mini'], 'not a segmentation model'),
                      (['--num-workers', -1], '--num-workers must be >= 0'),
                      (['--classes', 'a,b'], 'the synthetic data has 5 classes'),
                      (['--n-synth', 0], 'must be positive'),
                      (['--arch', 'unet', '--freeze'], 'unet has no encoder to freeze'),
                      (['--balance', 'pixels'], '--balance must be one of area, slice, source'),
                      (['--fg-crop', 1.5], '--fg-crop must be in [0, 1], got 1.5')):
        rc, err = cli(capsys, *base, *args)
        assert rc == 2 and msg in err, (args, err)
    assert not (tmp_path / 'ft').exists()                                              # nothing written
    for args, msg in ((['evaluate', 'x.safetensors', '--n-synth', 0], '--n-synth must be >= 1'),
                      (['predict', 'x.safetensors', 'a.png', '--device', 'gpu'], '--device must be auto, cpu, cuda'),
                      (['evaluate', 'x.safetensors', '--overlap', 1.5], '--overlap must be in [0, 1)')):
        rc, err = cli(capsys, *args)
        assert rc == 2 and msg in err, (args, err)


def test_pretrain_argument_errors(tmp_path, capsys):
    for args, msg in ((['--warmup', 1.5], '--warmup must be in [0, 1)'), (['--workers', -1], '--workers must be >= 0'),
                      (['--arch', 'aff_mini'], 'is not a pretraining model'),
                      (['--img-size', 8], '--img-size must be a multiple'),
                      (['--n-synth', 0], 'must be positive'), (['--valid-pct', 1], '--valid-pct must be in [0, 1)'),
                      (['--balance', 'pixels'], '--balance must be one of area, slice, source'),
                      (['--resume', tmp_path / 'none'], 'no such checkpoint')):
        rc, err = cli(capsys, 'pretrain', '--out', tmp_path / 'o', *args)
        assert rc == 2 and msg in err, (args, err)
    from affmae.cli import pretrain
    assert 'aff_mini' not in (pretrain.__doc__ or '') and 'aff_mini' not in str(pretrain.__wrapped__.__annotations__)


def _seg_folder(d, masks, size=40):
    for i, m in enumerate(masks):
        _png(d / 'images' / f'{i}.png', _em(i, size))
        _png(d / 'masks' / f'{i}.png', m)
    return d


def test_binary_masks_classes_and_colour_masks(tmp_path, capsys):
    half = (np.arange(40)[:, None] > 20) * np.ones(40, np.uint8)
    d = _seg_folder(tmp_path / 'bin', [half.astype(np.uint8)] * 3)
    out = tmp_path / 'ft'
    assert cli(capsys, 'finetune', '--data', d, '--arch', 'vitmae_tiny', '--img-size', 32, '--epochs', 1, '--bs', 2,
               '--valid-pct', .34, '--out', out)[0] == 0
    from affmae.checkpoint import load_model
    assert load_model(out / 'seg.safetensors')[1]['classes'] == ['background', 'class_1']   # not 'membrane'
    assert cli(capsys, 'finetune', '--data', d, '--arch', 'vitmae_tiny', '--img-size', 32, '--epochs', 1, '--bs', 2,
               '--valid-pct', .34, '--classes', 'bg,cell', '--fg-crop', 1, '--out', out, '--overwrite')[0] == 0
    assert load_model(out / 'seg.safetensors')[1]['classes'] == ['bg', 'cell']
    rgb = np.zeros((40, 40, 3), np.uint8); rgb[:10] = (255, 255, 0)                      # yellow
    _png(d / 'masks' / '1.png', rgb)
    rc, err = cli(capsys, 'finetune', '--data', d, '--arch', 'vitmae_tiny', '--img-size', 32,
                  '--out', tmp_path / 'ft2')
    assert rc == 2 and '1.png: colour mask' in err and 'class index' in err
    _png(d / 'masks' / '1.png', (half * 7).astype(np.uint8))
    rc, err = cli(capsys, 'finetune', '--data', d, '--arch', 'vitmae_tiny', '--img-size', 32, '--classes', 'bg,cell',
                  '--out', tmp_path / 'ft2')
    assert rc == 2 and '1.png: mask holds labels [7] outside 0..1' in err
    assert not (tmp_path / 'ft2').exists()


def test_constant_image_cannot_collapse_std(tmp_path):
    from affmae.data import pretrain_dls
    _png(tmp_path / 'd' / 'blank.png', np.full((64, 64), 200, np.uint8))
    with pytest.raises(ValueError, match='constant'): pretrain_dls(tmp_path / 'd', size=32, valid_pct=0, device='cpu')
    _png(tmp_path / 'd' / 'cell.png', _em(0, 64))
    with pytest.warns(UserWarning, match='constant'):
        dls = pretrain_dls(tmp_path / 'd', size=32, bs=2, valid_pct=0, device='cpu')
    assert dls.stats[1] > .05 and dls.one_batch()[0].abs().max() < 50


def test_seed_makes_runs_identical(tmp_path, capsys):
    for i in range(20): _png(tmp_path / 'd' / f'{i}.png', _em(i, 64))                   # random crops, shuffles, masks
    args = [*PRE[:3], '--img-size', 32, '--bs', 4, '--precision', 'none', '--data', tmp_path / 'd', '--epochs', 1]
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        random.seed(name); np.random.seed(ord(name)); torch.manual_seed(ord(name))     # scrambled global state
        assert cli(capsys, *args, '--seed', seed, '--out', tmp_path / name)[0] == 0
    w = {n: load_file(str(tmp_path / n / 'checkpoints' / 'epoch_000.safetensors')) for n in 'abc'}
    assert all(torch.equal(w['a'][k], w['b'][k]) for k in w['a'])
    assert not all(torch.equal(w['a'][k], w['c'][k]) for k in w['a'])


def test_corrupt_image_found_up_front_one_line(tmp_path, capsys):
    for i in range(30): _png(tmp_path / 'd' / f'{i:02d}.png', _em(i, 40))
    raw = (tmp_path / 'd' / '17.png').read_bytes(); (tmp_path / 'd' / '17.png').write_bytes(raw[:len(raw) // 2])
    rc, err = cli(capsys, *PRE, '--data', tmp_path / 'd', '--epochs', 1, '--workers', 2, '--out', tmp_path / 'o')
    assert rc == 2 and '17.png: truncated or corrupt image' in err
    assert not (tmp_path / 'o' / 'checkpoints').exists()


def test_worker_error_is_one_line(tmp_path, capsys):
    "A file that breaks only when decoded (valid checksums, corrupt pixels) fails in a worker: one line, naming it."
    import zlib, struct
    for i in range(40): _png(tmp_path / 'd' / f'{i:02d}.png', _em(i, 40))
    bad = min(set(range(40)) - set(random.Random(0).sample(range(40), 16)))            # not read for the statistics
    f = tmp_path / 'd' / f'{bad:02d}.png'
    raw = bytearray(f.read_bytes())
    i = raw.index(b'IDAT'); n = struct.unpack('>I', raw[i - 4:i])[0]
    raw[i + 4 + 10:i + 4 + n] = bytes(n - 10)                                           # zeroed deflate stream
    raw[i + 4 + n:i + 8 + n] = struct.pack('>I', zlib.crc32(bytes(raw[i:i + 4 + n])))    # with a valid checksum
    f.write_bytes(bytes(raw))
    rc, err = cli(capsys, *PRE, '--data', tmp_path / 'd', '--epochs', 1, '--workers', 2, '--out', tmp_path / 'o',
                  '--valid-pct', 0)
    assert rc == 2 and f'{f}: cannot read plane 0' in err and 'DataLoader worker' not in err


def test_fault_injection_ten_kills(tmp_path):
    "tests/fault_injection.py: ten SIGKILLs in steps and saves, resumed each time: the uninterrupted run's weights."
    r = subprocess.run([sys.executable, str(Path(__file__).parent / 'fault_injection.py'), '--dir', str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'OK: 10 kills (5 during steps, 5 during saves)' in r.stdout, r.stdout + r.stderr


def test_one_image_folder_hint_matches_the_command(tmp_path, capsys):
    _png(tmp_path / 'd' / 'only.png', _em(0, 64))
    rc, err = cli(capsys, *PRE, '--data', tmp_path / 'd', '--epochs', 1, '--out', tmp_path / 'o')
    assert rc == 2 and '--valid-pct 0' in err
    rc, err = cli(capsys, *PRE, '--data', tmp_path / 'd', '--epochs', 1, '--valid-pct', 0, '--out', tmp_path / 'o')
    assert rc == 0


def test_tensor_hyperparameters_round_trip(tmp_path):
    "A capturable optimiser's tensor lr is stored as a tensor, not pickled, and comes back as one."
    from types import SimpleNamespace
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-3))
    m(torch.randn(4, 3)).sum().backward(); opt.step()
    cb = Checkpoint(tmp_path)
    cb.learn = SimpleNamespace(opt=opt, model=m, dls=SimpleNamespace(loaders=[], stats=None), n_epoch=1)
    cb.save(0)
    st = L._load_state(tmp_path / 'epoch_000.safetensors')
    lr = st['opt']['param_groups'][0]['lr']
    assert torch.is_tensor(lr) and lr.item() == pytest.approx(1e-3)
    assert torch.equal(st['opt']['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])


def test_reconstruct_argument_errors(tmp_path, capsys):
    _png(tmp_path / 'img.png', _em(0, 48))
    for args, msg in ((['--size', 0], '--size must be at least'), (['--out', tmp_path], 'is a folder')):
        rc, err = cli(capsys, 'reconstruct', tmp_path / 'none.safetensors', tmp_path / 'img.png', *args)
        assert rc == 2 and msg in err, err
    rc, err = cli(capsys, 'reconstruct', tmp_path / 'none.safetensors', tmp_path / 'img.png', '--out',
                  tmp_path / 'r.png')
    assert rc == 2 and 'no such checkpoint' in err, err


def test_evaluate_classes_must_match_checkpoint(tmp_path, seg_ckpt, capsys):
    d = _seg_folder(tmp_path / 'data', [np.zeros((40, 40), np.uint8)] * 2)
    (d / 'masks' / 'classes.txt').write_text('background\nmitochondria\n')
    rc, err = cli(capsys, 'evaluate', seg_ckpt, '--data', d)
    assert rc == 2 and "classes background, mitochondria do not match the checkpoint's" in err, err
    assert len(err.strip().splitlines()) == 1
