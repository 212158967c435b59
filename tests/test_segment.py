"Segmentation: metrics vs numpy, loss, sliding-window inference, mask checks, outputs, fine-tuning overfit, CLI."
import json, subprocess, sys
import numpy as np, pytest, torch, torch.nn as nn
from affmae.registry import create_model
from affmae.checkpoint import load_model
from affmae.seg_metrics import *
from affmae.seg_models import *
from affmae.seg_io import *
from affmae.inference import *
from affmae.finetune import *

def np_scores(pred, targ, n, ignore=IGNORE):
    """Independent per-class IoU/Dice with boolean masks over the whole set (nan where a class is neither present nor
    predicted)."""
    keep = targ != ignore
    p, t = pred[keep], targ[keep]
    iou, dice = np.full(n, np.nan), np.full(n, np.nan)
    for c in range(n):
        inter, a, b = np.sum((p == c) & (t == c)), np.sum(p == c), np.sum(t == c)
        if a + b: iou[c], dice[c] = inter/(a + b - inter), 2*inter/(a + b)
    return iou, dice

@pytest.mark.parametrize('seed', range(4))
def test_metrics_match_numpy(seed):
    rng = np.random.default_rng(seed)
    n = 6
    # batches where classes 4 and 5 are rare or absent (5 never in targets, predicted in some seeds), some ignored
    # pixels
    targ = rng.choice(4, size=(3, 2, 17, 13), p=[.5, .3, .15, .05])
    targ[rng.random(targ.shape) < .1] = IGNORE
    if seed % 2: targ[targ == 3] = 0           # a class absent from every batch
    logits = rng.normal(size=(3, 2, n, 17, 13)).astype(np.float32)
    if seed < 2: logits[:, :, 5] -= 10         # class 5 never predicted either: nan
    ms = seg_metrics(tuple('abcdef'))
    for m in ms: m.reset()
    from types import SimpleNamespace
    for lo, t in zip(logits, targ):
        for m in ms: m.accumulate(SimpleNamespace(pred=torch.from_numpy(lo), y=torch.from_numpy(t)))
    iou, dice = np_scores(logits.argmax(2), targ, n)
    present = [c for c in range(n) if np.sum(targ == c)]      # the mean: classes present in the targets only
    assert np.isclose(ms[0].value, np.mean(iou[present]))
    vals = {m.name: m.value for m in ms[1:]}
    for c, name in enumerate('abcdef'):
        if c == 0: continue
        for k, ref in (('iou', iou[c]), ('dice', dice[c])):
            v = vals[f'{k}_{name}']
            assert (np.isnan(v) and np.isnan(ref)) or np.isclose(v, ref), (k, name, v, ref)
    if seed < 2: assert np.isnan(iou[5]) and np.isnan(vals['iou_f'])

def test_confusion_rejects_bad_labels():
    with pytest.raises(ValueError, match=r'labels \[9\] outside 0..4'):
        confusion(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 9, 2]), 5)

def test_sliding_window_exact_for_pixelwise_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    for shape, tile in [((1, 1, 203, 150), 64), ((2, 1, 45, 37), 64), ((1, 1, 96, 96), 48)]:
        img = torch.randn(shape)
        out = sliding_window(model, img, tile=tile, overlap=0.4, bs=5)
        assert out.shape == (shape[0], 4, *shape[2:])
        torch.testing.assert_close(out, model(img).detach(), rtol=1e-5, atol=1e-5)

def test_sliding_window_covers_every_pixel():
    # a model returning constant logits 1: any pixel missed by every tile would be 0/0 = nan
    one = lambda t: torch.ones(t.shape[0], 2, *t.shape[2:])
    for H, W, tile, ov in [(257, 131, 64, 0.0), (100, 301, 64, 0.25), (30, 20, 32, 0.5)]:
        out = sliding_window(one, torch.zeros(H, W), tile=tile, overlap=ov)
        assert torch.isfinite(out).all() and torch.allclose(out, torch.ones_like(out))
        for n in (H, W):
            s = tile_starts(n, tile, int(round(tile*(1 - ov))))
            covered = np.zeros(max(n, tile), bool)
            for o in s: covered[o:o + tile] = True
            assert covered[:n].all() and s[-1] + tile >= n

def test_sliding_window_blends_overlaps():
    # a model whose output depends on the tile's position gives a weighted mean, within the range of the tiles' values
    calls = []
    def model(t):
        calls.append(len(t)); return t.mean((2, 3), keepdim=True).expand(-1, 1, *t.shape[2:]).repeat(1, 2, 1, 1)
    img = torch.linspace(0, 1, 90)[None].repeat(70, 1)
    out = sliding_window(model, img, tile=32, overlap=0.5, bs=4)
    assert out.shape == (1, 2, 70, 90) and max(calls) <= 4
    assert out.min() >= 0 and out.max() <= 1 and (out[0, 0, 0, 1:] >= out[0, 0, 0, :-1] - 1e-6).all()

def test_loss_matches_reference_and_checks():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 7, generator=g, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 9, 7), generator=g); t[1, 3:] = IGNORE
    keep = (t != IGNORE).reshape(-1)
    xs = x.permute(0, 2, 3, 1).reshape(-1, 3)[keep]; ts = t.reshape(-1)[keep]
    p = torch.softmax(xs, 1); y = torch.nn.functional.one_hot(ts, 3).double()
    ref = -torch.log(p[torch.arange(len(ts)), ts]).mean() + 1 - ((2*(p*y).sum(0) + 1)/(p.sum(0) + y.sum(0) + 1)).mean()
    assert torch.isclose(CEDiceLoss()(x.float(), t), ref.float(), rtol=1e-5)
    with pytest.raises(ValueError, match='do not match'): CEDiceLoss()(x, t[0])
    with pytest.raises(ValueError, match=r'mask labels must lie in 0..2'): CEDiceLoss()(x, t.clamp_max(2) + 1)

def test_mask_errors(tmp_path):
    import tifffile
    from PIL import Image
    m = np.random.default_rng(0).integers(0, 5, (24, 32)).astype(np.uint8)
    tifffile.imwrite(tmp_path/'ok.tif', m)
    assert (load_mask(tmp_path/'ok.tif', 5, shape=(24, 32)) == m).all()
    with pytest.raises(ValueError, match=r'mask is 24×32 but its image is 32×24'):
        load_mask(tmp_path/'ok.tif', 5, shape=(32, 24))
    with pytest.raises(ValueError, match=r'labels \[5, 6\] outside 0..4'):
        check_mask(np.where(m == 1, 5, np.where(m == 2, 6, m)), 5, name='x')
    Image.fromarray(np.stack([m*40, m*20, 255 - m*40], -1)).save(tmp_path/'rgb.png')   # a colour rendering, not labels
    with pytest.raises(ValueError, match=r'rgb.png: .*mask'): load_mask(tmp_path/'rgb.png', 5)
    with pytest.raises(ValueError, match='expected a 2-D label image'): check_mask(np.stack([m]*3, -1), 5)
    (tmp_path/'broken.tif').write_bytes(b'II*\x00garbage')
    with pytest.raises(ValueError, match='broken.tif: cannot read'): load_mask(tmp_path/'broken.tif', 5)
    with pytest.raises(ValueError, match='non-integer'): check_mask(m/2, 5)

def test_writers(tmp_path):
    import tifffile
    from PIL import Image
    img = np.random.default_rng(1).random((20, 30)).astype(np.float32)
    lbl = np.zeros((20, 30), np.int64); lbl[5:10, 5:20] = 2
    save_labels(lbl, tmp_path/'l.tif'); save_overlay(img, lbl, tmp_path/'o.png')
    assert (tifffile.imread(tmp_path/'l.tif') == lbl).all()
    o = np.asarray(Image.open(tmp_path/'o.png'))
    assert o.shape == (20, 30, 3)
    assert (o[0, 0, 0] == o[0, 0, 1] == o[0, 0, 2])          # background stays grey
    assert not (o[7, 7, 0] == o[7, 7, 1] == o[7, 7, 2])     # class 2 is tinted

def tiny_dls(n=4, size=48, epoch_len=160, seed=0):
    "Four tiny synthetic images for training, the same four (whole, unaugmented) for validation."
    from fastai.data.core import DataLoaders
    from affmae.data import segment_dls, EMBatch, EMCrops
    d = segment_dls(None, size=size, bs=4, n_synth=n, valid_pct=0, synth_size=size,
                    synth_kw=dict(cell=48., mito=(6., 12.)), epoch_len=epoch_len, seed=seed, device='cpu')
    v = d.train.new(dataset=EMCrops(d.src, range(n), size, train=False, masks=True), shuffle=False, drop_last=False,
                    after_batch=EMBatch(*d.stats, augment=False))
    return DataLoaders(d.train, v, device='cpu')

@pytest.fixture
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.mark.parametrize('arch,lr', [('affmae_tiny', 4e-3), ('vitmae_tiny', 1e-2)])
def test_overfit_handful_of_images(arch, lr, one_thread):
    torch.manual_seed(0)
    dls = tiny_dls()
    learn = seg_learner(dls, arch, per_class=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, lr)        # 160 steps
    # independent score: whole images, numpy IoU over the 4 training images
    learn.model.eval()
    x, y = dls.valid.one_batch()
    with torch.no_grad(): p = learn.model(x).argmax(1).numpy()
    iou, _ = np_scores(p, y.numpy(), 5)
    assert np.nanmean(iou) >= 0.6, (arch, iou)
    assert np.isclose(learn.recorder.values[-1][2], np.nanmean(iou), atol=1e-6)
    # sliding window on an image whose size is no multiple of the tile: covers every pixel, and agrees with the
    # whole-image prediction (attention is not local, so tiles see less context: agreement, not equality)
    from affmae.synth import synth_em
    img = (synth_em((72, 88), seed=5, cell=48., mito=(6., 12.))[0]
           - dls.train.after_batch.mean)/dls.train.after_batch.std
    whole = learn.model(img[None, None]).argmax(1)
    tiled = sliding_window(learn.model, img, tile=48, overlap=0.5)
    assert tiled.shape == (1, 5, 72, 88) and torch.isfinite(tiled).all()
    assert (tiled.argmax(1) == whole).float().mean() > 0.8

def test_layer_decay_and_groups():
    for arch in ('affmae_tiny', 'vitmae_tiny'):
        m = create_model(arch, 'segmentation')
        gs = layer_splitter(m)
        assert sum(map(len, gs)) == len(list(m.parameters())) == len({id(p) for g in gs for p in g}) and len(gs) > 3
    learn = seg_learner(tiny_dls(epoch_len=4), 'vitmae_tiny', lr_decay=0.7, per_class=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 2e-3)
    lrs = np.array([h['lr'] for h in learn.opt.hypers])
    assert np.allclose(lrs, 2e-3*0.7**np.arange(len(lrs))[::-1])

def test_load_pretrained_reports_keys():
    seg = create_model('affmae_tiny', 'segmentation')
    mae = backbone('affmae_tiny')
    rep = load_pretrained(seg, mae.state_dict(), verbose=False)
    assert {k.split('.')[0] for k in rep['new']} == {'head'} and rep['loaded'] and not rep['mismatched']
    sd = seg.state_dict()
    assert all(torch.equal(sd[k], mae.state_dict()[k]) for k in rep['loaded'])
    with pytest.raises(ValueError, match='holds none of the model'):
        load_pretrained(create_model('vitmae_tiny', 'segmentation'), mae.state_dict())

def test_cli_finetune_predict_evaluate(tmp_path, one_thread):
    import tifffile, warnings
    from affmae.synth import synth_em
    from affmae.cli import main
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(['finetune', '--arch', 'vitmae_tiny', '--img-size', '48', '--epochs', '1', '--bs', '4',
                     '--n-synth', '4', '--head', 'image', '--out', str(tmp_path/'run')]) == 0
    ck = tmp_path/'run'/'seg.safetensors'
    assert ck.exists() and (tmp_path/'run'/'history.json').exists()
    model, rec = load_model(ck)
    assert rec['arch'] == 'vitmae_tiny' and rec['tile'] == 48 and len(rec['classes']) == 5
    assert rec['config']['head_skip'] == model.head.skip == 'image'                  # --head reaches the checkpoint
    img = (synth_em((100, 60), seed=9)[0].numpy()*255).astype(np.uint8)
    tifffile.imwrite(tmp_path/'stack.tif', np.stack([img, img[::-1]]))               # a 2-plane stack
    assert main(['predict', str(ck), str(tmp_path/'stack.tif'), '--out', str(tmp_path/'pred')]) == 0
    lbl = tifffile.imread(tmp_path/'pred'/'stack_labels.tif')
    assert lbl.shape == (2, 100, 60) and lbl.max() < 5 and (tmp_path/'pred'/'stack_overlay.png').exists()
    assert main(['evaluate', str(ck), '--n-synth', '2', '--json-out', str(tmp_path/'s.json')]) == 0
    res = json.loads((tmp_path/'s.json').read_text())
    assert 0 <= res['miou'] <= 1 and set(res['per_class']) == set(rec['classes'])
    assert main(['evaluate', str(ck), '--n-synth', '2', '--tta', '--json-out', str(tmp_path/'t.json')]) == 0
    tta = json.loads((tmp_path/'t.json').read_text())
    assert tta['tta'] and not res['tta'] and 0 <= tta['miou'] <= 1 and tta['n_pixels'] == res['n_pixels']
    assert main(['predict', str(ck), str(tmp_path/'stack.tif'), '--out', str(tmp_path/'pred_tta'), '--tta']) == 0
    assert tifffile.imread(tmp_path/'pred_tta'/'stack_labels.tif').shape == (2, 100, 60)
    # bad arguments: clear message, non-zero exit
    assert main(['finetune', '--label-frac', '1.5']) == 2
    assert main(['finetune', '--head', 'u-net']) == 2 and main(['finetune', '--arch', 'unet', '--head', 'image']) == 2
    assert main(['evaluate', str(tmp_path/'nope.safetensors')]) == 2
    assert main(['predict', str(ck), str(tmp_path/'missing.tif')]) == 2

def test_cli_finetune_lr_from_pretrained(tmp_path, one_thread):
    """From pretrained weights the peak lr defaults to `PRETRAINED_LR`; `--lr` and a preset's lr still win; `--head-lr`
    sets the head's own; `--aux-weight` is recorded, and its read-out saved and rebuilt."""
    import warnings
    from affmae.cli import main
    tiny = ['--arch', 'vitmae_tiny', '--img-size', '32', '--bs', '4', '--n-synth', '4', '--epochs', '1']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(['pretrain', *tiny, '--precision', 'none', '--out', str(tmp_path/'pre')]) == 0
        pre = ['--pretrained', str(tmp_path/'pre'/'checkpoints')]
        runs = {'scratch': [], 'pretrained': pre, 'given': [*pre, '--lr', '5e-4'], 'paper': [*pre, '--recipe', 'paper'],
                'head': [*pre, '--head-lr', '1e-3'], 'aux': [*pre, '--aux-weight', '0.4']}
        for name, extra in runs.items():
            assert main(['finetune', *tiny, *extra, '--out', str(tmp_path/name)]) == 0
        assert main(['finetune', *tiny, '--head-lr', '0']) == 2
        assert main(['finetune', *tiny, '--arch', 'unet', '--head-lr', '1e-3']) == 2
        assert main(['finetune', *tiny, '--aux-weight', '-1']) == 2
        assert main(['finetune', *tiny, '--arch', 'unet', '--aux-weight', '0.4']) == 2
    recipe = {k: load_model(tmp_path/k/'seg.safetensors')[1]['recipe'] for k in runs}
    assert {k: r['lr'] for k, r in recipe.items()} == dict(
        scratch=FINETUNE_DEFAULTS['lr'], pretrained=PRETRAINED_LR, given=5e-4, paper=FINETUNE_RECIPES['paper']['lr'],
        head=PRETRAINED_LR, aux=PRETRAINED_LR) and PRETRAINED_LR < FINETUNE_DEFAULTS['lr']
    assert recipe['head']['head_lr'] == 1e-3 and recipe['pretrained']['head_lr'] is None
    assert recipe['aux']['aux_weight'] == .4 and recipe['pretrained']['aux_weight'] == 0
    model, meta = load_model(tmp_path/'aux'/'seg.safetensors')          # the read-out comes back with the weights
    assert meta['config']['head_aux'] and model.head.aux is not None and 'head_aux' not in load_model(
        tmp_path/'pretrained'/'seg.safetensors')[1]['config']

def _low_contrast(root, n=4, size=48):
    "A folder `root` of `n` low-contrast 8-bit synthetic EM images and masks (CLAHE changes them a lot)."
    import tifffile
    from affmae.synth import synth_em
    for d in ('images', 'masks'): (root/d).mkdir(parents=True)
    for i in range(n):
        img, lbl = synth_em((size, size), seed=i)
        tifffile.imwrite(root/'images'/f'{i}.tif', (100 + 40*img.numpy()).astype(np.uint8))
        tifffile.imwrite(root/'masks'/f'{i}.tif', lbl.numpy().astype(np.uint8))
    return root

def test_cli_finetune_clahe(tmp_path, one_thread, capsys):
    """`finetune --clahe` records its clip, and `prep_plane` with the checkpoint's metadata prepares a raw image from
    disk as the training loader did; `--pre-stats` takes the CLAHE, fixed normalisation and resize a `pretrain --recipe
    paper` run recorded, and `predict` labels at the image's own shape; a bad clip, or one that contradicts the
    pretraining's, or a crop larger than its resize, is a one-line error."""
    import tifffile, warnings
    from affmae.cli import main
    from affmae.checkpoint import read_meta
    from affmae.prep import CLAHE_CLIP, PAPER_STATS
    from affmae.readers import read_plane
    data = _low_contrast(tmp_path/'data')
    tiny = ['--data', str(data), '--img-size', '48', '--epochs', '1', '--bs', '2', '--valid-pct', '0.25']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = finetune(data=str(data), arch='unet', img_size=48, epochs=1, bs=2, valid_pct=.25, clahe=3.,
                         out=str(tmp_path/'clahe'))
        meta = read_meta(tmp_path/'clahe'/'seg.safetensors')
        assert (meta['clahe'], meta['pct'], meta['recipe']['clahe']) == (3., [0.5, 99.5], 3.)
        vds = learn.dls.valid.dataset
        raw = read_plane(vds.src.name(vds.idxs[0]))                                   # the held-out image, from disk
        seen = learn.dls.valid.one_batch()[0][:1]                                     # whole: the crop is the image
        torch.testing.assert_close(prep_plane(raw, meta['stats'], meta['pct'], meta['clahe']), seen, atol=1e-5, rtol=0)
        assert (prep_plane(raw, meta['stats'], meta['pct']) - seen).abs().max() > .1   # the clip matters
        ck = str(tmp_path/'clahe'/'seg.safetensors')
        assert main(['predict', ck, str(data/'images'), '--out', str(tmp_path/'pred')]) == 0
        assert main(['evaluate', ck, '--data', str(data), '--json-out', str(tmp_path/'s.json')]) == 0
        assert main(['pretrain', '--recipe', 'paper', '--arch', 'vitmae_tiny', '--data', 'synthetic', '--n-synth', '4',
                     '--img-size', '32', '--bs', '4', '--epochs', '1', '--precision', 'none',
                     '--out', str(tmp_path/'pre')]) == 0
        pre = ['finetune', *tiny, '--arch', 'vitmae_tiny', '--pretrained', str(tmp_path/'pre'/'checkpoints'),
               '--pre-stats']
        assert main([*pre, '--out', str(tmp_path/'pre_run')]) == 0
    meta = read_meta(tmp_path/'pre_run'/'seg.safetensors')
    assert (meta['clahe'], meta['pct'], meta['stats']) == (CLAHE_CLIP, None, list(PAPER_STATS))
    assert (meta['resize'], meta['recipe']['resize']) == (512, 512)   # the pretraining's resize, picked up and recorded
    assert read_meta(tmp_path/'clahe'/'seg.safetensors')['resize'] is None
    assert main(['predict', str(tmp_path/'pre_run'), str(data/'images'/'0.tif'), '--out', str(tmp_path/'pre_pred'),
                 '--bs', '64']) == 0                                 # run at 512², labels back at 48²
    assert tifffile.imread(tmp_path/'pre_pred'/'0_labels.tif').shape == (48, 48)
    capsys.readouterr()
    for args, msg in (([*pre, '--clahe', '3'], "--clahe 3.0 contradicts --pre-stats (the pretraining's CLAHE clip: 4."),
                      ([*pre, '--img-size', '1024'], '--img-size 1024 is larger than the images --pre-stats resizes'),
                      (['finetune', *tiny, '--clahe', '0'], '--clahe must be a positive clip limit, got 0.0'),
                      (['finetune', *tiny, '--clahe', '-1'], '--clahe must be a positive clip limit, got -1.0')):
        assert main([*args, '--out', str(tmp_path/'bad')]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err

def test_cli_pretrain_clahe(tmp_path, one_thread, capsys):
    """`pretrain --clahe` equalises the crops it trains on and records the clip, which `finetune --pre-stats` then
    applies; a bad clip, or one asked of shards, is a one-line error."""
    import warnings
    from affmae.cli import main, pretrain
    from affmae.checkpoint import read_meta, pretraining_prep
    data = _low_contrast(tmp_path/'data')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = pretrain(data=[str(data/'images')], arch='affmae_tiny', img_size=32, bs=2, epochs=1, clahe=3.,
                         precision='none', valid_pct=.25, out=str(tmp_path/'pre'))
        assert learn.dls.train_ds.clahe == 3. and learn.dls.valid_ds.clahe == 3.
        assert pretraining_prep(tmp_path/'pre'/'checkpoints')['clahe'] == 3.
        assert main(['finetune', '--data', str(data), '--arch', 'affmae_tiny', '--img-size', '32', '--epochs', '1',
                     '--bs', '2', '--valid-pct', '0.25', '--pretrained', str(tmp_path/'pre'/'checkpoints'),
                     '--pre-stats', '--out', str(tmp_path/'seg')]) == 0
    assert read_meta(tmp_path/'seg'/'seg.safetensors')['clahe'] == 3.
    capsys.readouterr()
    for args, msg in ((['--clahe', '0'], '--clahe must be a positive clip limit, got 0.0'),
                      (['--clahe', '2', '--data', str(tmp_path/'shard-{000000..000001}.tar')],
                       "--clahe equalises images as they are read, not shards' crops")):
        assert main(['pretrain', *args, '--out', str(tmp_path/'bad')]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err

def test_evaluate_folder_mismatched_mask(tmp_path):
    import tifffile
    (tmp_path/'images').mkdir(); (tmp_path/'masks').mkdir()
    tifffile.imwrite(tmp_path/'images'/'a.tif', np.zeros((40, 40), np.uint8))
    tifffile.imwrite(tmp_path/'masks'/'a.tif', np.full((40, 40), 7, np.uint8))     # label 7 with 5 classes
    model = nn.Conv2d(1, 5, 1)
    rec = dict(classes=list('abcde'), stats=(0.5, 0.2), tile=32)
    with pytest.raises(ValueError, match=r'a.tif: labels \[7\] outside 0..4'):
        evaluate_model(model, eval_source(str(tmp_path)), rec)


def test_focal_dice_loss_float64():
    "Focal (gamma 2, class weights) + foreground Dice against the formula in float64, with ignored pixels."
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 6, generator=g)
    t = torch.randint(0, 5, (2, 7, 6), generator=g); t[0, 0] = IGNORE
    alpha = torch.tensor([.2, 2., 3., 2., 3.], dtype=torch.float64)
    keep = t != IGNORE
    p = x.double().softmax(1).permute(0, 2, 3, 1)[keep]               # (N, C)
    y = t[keep]
    pt = p[torch.arange(len(y)), y]
    focal = (-alpha[y] * (1 - pt)**2 * pt.log()).mean()
    oh = torch.nn.functional.one_hot(y, 5).double()
    dice = (2*(p*oh).sum(0) + 1)/(p.sum(0) + oh.sum(0) + 1)
    ref = focal + 1 - dice[1:].mean()
    got = seg_loss('focal_dice', gamma=2., weight=alpha.tolist())(x, t)
    assert abs(got.item() - ref.item()) < 1e-5


def test_image_fg_iou_hand_cases():
    "Per-image IoU of each foreground class; a class in neither prediction nor label counts 1; ignore skipped."
    t = torch.tensor([[1, 1], [0, IGNORE]])
    assert image_fg_iou(t, t, 3).tolist() == [[1., 1.]]                              # exact, class 2 absent: 1
    assert image_fg_iou(torch.zeros_like(t), t, 3).tolist() == [[0., 1.]]            # class 1 missed
    p = torch.tensor([[1, 2], [1, 2]])                          # the ignored pixel's prediction counts nowhere
    s = image_fg_iou(torch.stack([p, t]), torch.stack([t, t]), 3)
    assert torch.allclose(s, torch.tensor([[1/3, 0.], [1., 1.]], dtype=torch.float64))  # class 1: 1 of a union of 3


def test_model_layer_imports_no_training_layer():
    "The segmentation models, the registry and the checkpoint format know nothing of fastai or the training modules."
    code = ("import sys, affmae.seg_models, affmae.checkpoint, affmae.registry\n"
            "bad = [m for m in sys.modules if m.startswith(('fastai', 'affmae.learner', 'affmae.finetune', "
            "'affmae.cli'))]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('arch', ['affmae_tiny', 'vitmae_tiny'])
def test_head_without_image_path(arch, tmp_path):
    "`head_skip='none'`: the logits depend on the backbone's features alone, and the choice survives a checkpoint."
    from affmae.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = create_model(arch, 'segmentation', n_classes=3, head_skip='none').eval()
    hd = model.head
    feats, img = torch.randn(1, hd.proj[0].in_channels, 6, 6), torch.randn(1, 1, 6 * hd.stride, 6 * hd.stride)
    with torch.no_grad(): same = hd(feats, img), hd(feats, torch.randn_like(img))
    assert torch.equal(*same) and not any('skips' in n for n, _ in model.named_parameters())
    save_checkpoint(model, tmp_path / 'seg.safetensors', ['a', 'b', 'c'])
    back, meta = load_model(tmp_path)
    assert meta['config']['head_skip'] == back.head.skip == 'none'
    with torch.no_grad(): assert torch.allclose(back(img), model(img))


@pytest.mark.parametrize('arch', ['affmae_tiny', 'vitmae_tiny'])
def test_head_unet_image_path(arch, tmp_path):
    "`head_skip='unet'`: one image level more than the pyramid, at the head's input stride, used; kept by a checkpoint."
    from affmae.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = create_model(arch, 'segmentation', n_classes=3, head_skip='unet').eval()
    hd, pyr = model.head, create_model(arch, 'segmentation', n_classes=3, head_skip='pyramid').head
    img = torch.randn(1, 1, 4 * hd.stride, 4 * hd.stride)
    ims = hd.image_features(img)
    assert len(ims) == len(pyr.image_features(img)) + 1 and ims[0].shape[-2:] == (4, 4)
    assert hd.proj[0].in_channels == pyr.proj[0].in_channels + ims[0].shape[1]
    feats = torch.randn(1, pyr.proj[0].in_channels, 4, 4)
    with torch.no_grad():
        out = hd(feats, img)
        hd.image_features = lambda x: [torch.zeros_like(ims[0]), *ims[1:]]       # the deepest level zeroed alone
        assert not torch.allclose(hd(feats, img), out)
    del hd.image_features
    save_checkpoint(model, tmp_path / 'seg.safetensors', ['a', 'b', 'c'])
    back, meta = load_model(tmp_path)
    assert meta['config']['head_skip'] == back.head.skip == 'unet'
    with torch.no_grad(): assert torch.allclose(back(img), model(img))
