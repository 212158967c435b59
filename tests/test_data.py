"File-level tests of `affmae.readers` and `affmae.data`: real TIFF/PNG/JPEG files (broken ones too) in a temp dir."
import warnings
import numpy as np, pytest, tifffile, torch
from PIL import Image
from fastai.torch_core import set_seed
import matplotlib
matplotlib.use('Agg')
from matplotlib.figure import Figure
import affmae.data as data, affmae.readers as readers
from affmae.synth import *
from affmae.readers import *
from affmae.prep import *
from affmae.data import *

def png(path, a): Image.fromarray(a).save(path); return path
def rnd(shape, dtype=np.uint8, seed=0):
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max, shape, dtype=dtype, endpoint=True)

# ---- reading: formats, bit depths, stacks

def test_formats_and_bit_depths(tmp_path):
    a8, a16 = rnd((40, 50)), rnd((40, 50), np.uint16)
    af = np.random.default_rng(1).normal(0, 1, (40, 50)).astype(np.float32)
    png(tmp_path/'a8.png', a8)
    png(tmp_path/'a16.png', a16)
    tifffile.imwrite(tmp_path/'a16.tif', a16)
    tifffile.imwrite(tmp_path/'af.tiff', af)
    Image.fromarray(a8).save(tmp_path/'j.jpg', quality=95)
    np.testing.assert_array_equal(read_plane(tmp_path/'a8.png'), a8)
    np.testing.assert_array_equal(read_plane(tmp_path/'a16.png').astype(np.int64), a16.astype(np.int64))
    np.testing.assert_array_equal(read_plane(tmp_path/'a16.tif'), a16)
    np.testing.assert_array_equal(read_plane(tmp_path/'af.tiff'), af)
    assert np.abs(read_plane(tmp_path/'j.jpg').astype(float) - a8).mean() < 40   # lossy, but the same image
    src = EMFolder(tmp_path)
    assert len(src) == 5 and [src.shape(i) for i in range(5)] == [(40, 50)]*5

@pytest.mark.parametrize('n', [2, 3, 4, 7])
def test_stack_slices(tmp_path, n):
    "Every slice of a 3-D stack is an item (tifffile stores 3- and 4-slice arrays as planar samples: still slices)."
    vol = rnd((n, 24, 32), np.uint16, seed=n)
    tifffile.imwrite(tmp_path/'vol.tif', vol)
    png(tmp_path/'z.png', rnd((24, 32)))
    src = EMFolder(tmp_path)
    assert len(src) == n + 1
    for k in range(n): np.testing.assert_array_equal(src.image(k), vol[k])
    assert src.name(1) == f"{tmp_path/'vol.tif'}[1]"

def test_compressed_and_big_endian_stacks(tmp_path):
    vol = rnd((3, 40, 48), np.uint16, seed=5)
    tifffile.imwrite(tmp_path/'z.tif', vol, compression='zlib')
    tifffile.imwrite(tmp_path/'be.tif', vol, byteorder='>')
    src = EMFolder(tmp_path)
    assert len(src) == 6
    for i in range(6): np.testing.assert_array_equal(src.image(i), vol[i % 3])

def test_hyperstack_slices(tmp_path):
    vol = rnd((2, 3, 16, 20), seed=3)
    tifffile.imwrite(tmp_path/'h.tif', vol, imagej=True, metadata={'axes': 'ZCYX'})
    src = EMFolder(tmp_path)
    assert len(src) == 6
    np.testing.assert_array_equal(src.image(4), vol[1, 1])

def test_indexing_is_lazy(tmp_path, monkeypatch):
    "Building the index of a folder reads headers only, never pixels."
    tifffile.imwrite(tmp_path/'vol.tif', rnd((6, 32, 32)))
    png(tmp_path/'a.png', rnd((32, 32)))
    calls = []
    for mod, name in ((readers, '_read_plane'), (data, '_memmap_planes')):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, orig=orig, name=name: calls.append(name) or orig(*a))
    src = EMFolder(tmp_path, min_size=32)
    assert len(src) == 7 and calls == []
    src.image(3)
    assert calls == ['_memmap_planes']                        # the uncompressed stack is mapped, not read

def test_rgb_converted_with_warning(tmp_path):
    a = np.zeros((20, 30, 3), np.uint8); a[..., 1] = 200
    png(tmp_path/'rgb.png', a)
    tifffile.imwrite(tmp_path/'rgb.tif', a, photometric='rgb')
    for f in ('rgb.png', 'rgb.tif'):
        with pytest.warns(UserWarning, match=f'{f}: RGB image converted to grayscale'):
            g = read_plane(tmp_path/f)
        assert g.shape == (20, 30)
        np.testing.assert_allclose(g, 0.587*200, rtol=1e-5)

# ---- bad input: each problem gets a clear error naming the file

def test_empty_folder(tmp_path):
    (tmp_path/'notes.txt').write_text('no images here')
    with pytest.raises(EMDataError, match=f'{tmp_path}: no images found'): pretrain_dls(tmp_path, device='cpu')
    with pytest.raises(EMDataError, match='no such file or folder'): pretrain_dls(tmp_path/'missing', device='cpu')

def test_corrupt_file(tmp_path):
    png(tmp_path/'good.png', rnd((64, 64)))
    (tmp_path/'bad.tif').write_bytes(b'II*\x00' + b'\xff'*40)          # TIFF magic, garbage after it
    with pytest.raises(EMDataError, match=r'bad\.tif: cannot read image header'):
        pretrain_dls(tmp_path, size=64, device='cpu')

def test_truncated_file(tmp_path):
    "A file whose header is fine but whose pixels are cut off fails when read, naming the file."
    png(tmp_path/'a.png', rnd((64, 64)))
    png(tmp_path/'cut.png', rnd((64, 64), seed=1))
    raw = (tmp_path/'cut.png').read_bytes()
    (tmp_path/'cut.png').write_bytes(raw[:len(raw)//2])
    with pytest.raises(EMDataError, match=r'cut\.png: truncated or corrupt image'):
        pretrain_dls(tmp_path, size=64, valid_pct=0, device='cpu')

def test_image_smaller_than_crop(tmp_path):
    png(tmp_path/'big.png', rnd((300, 300)))
    png(tmp_path/'small.png', rnd((100, 120)))
    with pytest.raises(EMDataError, match=r'small\.png: image is 100x120, smaller than the crop size 128'):
        pretrain_dls(tmp_path, size=128, device='cpu')

def test_nan_inf_pixels(tmp_path):
    for name, bad in (('nan.tif', np.nan), ('inf.tif', np.inf)):
        d = tmp_path/name[:3]; d.mkdir()
        a = np.random.default_rng(0).random((64, 64)).astype(np.float32); a[3, 4] = bad; a[10, 10] = -np.inf
        tifffile.imwrite(d/name, a)
        with pytest.raises(EMDataError, match=f'{name}: plane 0 has 2 NaN/inf pixels'):
            pretrain_dls(d, size=32, valid_pct=0, device='cpu')

def _seg_folder(d, n=2, size=64, mask_size=None):
    (d/'images').mkdir(); (d/'masks').mkdir()
    for i in range(n):
        png(d/'images'/f'im{i}.png', rnd((size, size), seed=i))
        png(d/'masks'/f'im{i}.png', (rnd(mask_size or (size, size), seed=i) % 3).astype(np.uint8))
    return d

def test_mask_size_mismatch(tmp_path):
    d = _seg_folder(tmp_path, mask_size=(64, 80))
    with pytest.raises(EMDataError, match=r'im0\.png: mask is 64x80 but its image im0\.png is 64x64'):
        segment_dls(d, size=32, device='cpu')

def test_mask_without_image(tmp_path):
    d = _seg_folder(tmp_path)
    png(d/'masks'/'orphan_mask.png', np.zeros((64, 64), np.uint8))
    with pytest.raises(EMDataError,
                       match=r"orphan_mask\.png: mask has no matching image \(no image with stem 'orphan'\)"):
        segment_dls(d, size=32, device='cpu')

def test_image_without_mask(tmp_path):
    d = _seg_folder(tmp_path)
    png(d/'images'/'lonely.png', rnd((64, 64)))
    with pytest.raises(EMDataError, match=r"lonely\.png: image has no mask"): segment_dls(d, size=32, device='cpu')

def test_mask_stack_mismatch(tmp_path):
    tifffile.imwrite(tmp_path/'v.tif', rnd((5, 32, 32)))
    tifffile.imwrite(tmp_path/'v_mask.tif', np.zeros((3, 32, 32), np.uint8), photometric='minisblack')
    with pytest.raises(EMDataError, match=r'v_mask\.tif: mask has 3 planes but its image v\.tif has 5 slices'):
        segment_dls(tmp_path, size=32, device='cpu')

def test_mask_label_out_of_range(tmp_path):
    d = _seg_folder(tmp_path)
    png(d/'masks'/'im1.png', np.full((64, 64), 9, np.uint8))
    # before training
    with pytest.raises(EMDataError, match=r"im1\.png: mask holds labels \[9\] outside 0..2 \(classes bg, a, b\)"):
        segment_dls(d, size=32, bs=2, valid_pct=0, device='cpu', codes=('bg', 'a', 'b'))

def test_non_binary_multichannel_mask(tmp_path):
    png(tmp_path/'a.png', rnd((32, 32)))
    m = np.zeros((3, 32, 32), np.uint8); m[0, 0, :3] = (1, 2, 3)
    tifffile.imwrite(tmp_path/'a_mask.tif', m, photometric='minisblack')
    with pytest.raises(EMDataError, match=r'a_mask\.tif: multi-channel mask is not binary'):
        segment_dls(tmp_path, size=32, valid_pct=0, device='cpu').one_batch()

# ---- masks, pairing conventions, and the DataLoaders

def test_suffix_convention_and_multichannel_masks(tmp_path):
    "Same-folder `<stem>_mask` pairing; a multi-channel binary TIFF mask becomes labels 1..C."
    img = rnd((48, 48))
    ch = np.zeros((2, 48, 48), np.uint8); ch[0, :, :24] = 255; ch[1, 40:] = 255
    png(tmp_path/'cellA.png', img)
    tifffile.imwrite(tmp_path/'cellA_mask.tif', ch, photometric='minisblack')
    src = EMFolder(tmp_path, masks=True)
    assert len(src) == 1
    lbl = src.mask(0)
    assert (lbl[:40, :24] == 1).all() and (lbl[40:, :24] == 1).all()
    assert (lbl[40:, 24:] == 2).all() and (lbl[:40, 24:] == 0).all()
    dls = segment_dls(tmp_path, size=48, bs=1, valid_pct=0, device='cpu')
    x, m = dls.one_batch()
    assert sorted(m.unique().tolist()) == [0, 1, 2]

def test_image_and_mask_stay_aligned(tmp_path):
    "Through random crops and dihedral transforms, the mask still marks exactly the bright pixels."
    d = tmp_path; (d/'images').mkdir(); (d/'masks').mkdir()
    for i in range(3):
        a = rnd((96, 80), seed=i)
        png(d/'images'/f's{i}.png', a)
        png(d/'masks'/f's{i}_mask.png', (a >= 128).astype(np.uint8))
    dls = segment_dls(d, size=40, bs=3, valid_pct=0, epoch_len=24, device='cpu')
    assert dls.train_ds.carrier == np.uint8
    for b in dls.train:
        x, m = dls.train.after_batch.decode(b)
        for xi, mi in zip(x[:, 0], m.bool()):
            assert xi[mi].min() > xi[~mi].max()

def test_normalised_batches(tmp_path):
    "16-bit data with hot pixels and an offset comes out of the loader with ~zero mean and unit std."
    rng = np.random.default_rng(0)
    for i in range(4):
        a = (20000 + 3000*i + 2000*rng.standard_normal((128, 128))).clip(0, 65535).astype(np.uint16)
        a[rng.integers(0, 128, 20), rng.integers(0, 128, 20)] = 65535
        tifffile.imwrite(tmp_path/f'a{i}.tif', a)
    dls = pretrain_dls(tmp_path, size=64, bs=4, valid_pct=0.25, device='cpu', epoch_len=16)
    assert len(dls.train_ds.idxs) == 3 and len(dls.valid_ds.idxs) == 1
    assert dls.train_ds.carrier == np.float32                  # 16-bit data travels as float32, 8-bit as uint8
    xs = torch.cat([b[0] for b in dls.train])
    assert xs.shape == (16, 1, 64, 64)
    assert abs(xs.mean().item()) < 0.2 and abs(xs.std().item() - 1) < 0.2

def test_large_crop(tmp_path):
    png(tmp_path/'big.png', rnd((2100, 2080)))
    dls = pretrain_dls(tmp_path, size=2048, bs=1, valid_pct=0, device='cpu')
    assert dls.one_batch()[0].shape == (1, 1, 2048, 2048)

def test_synth_dls_and_show_batch(tmp_path):
    dls = pretrain_dls('synthetic', size=64, bs=4, n_synth=8, device='cpu')
    (x,) = dls.one_batch()
    assert x.shape == (4, 1, 64, 64) and x.dtype == torch.float32
    assert isinstance(dls.show_batch(show=False), Figure)
    sdls = segment_dls(size=64, bs=4, n_synth=4, device='cpu')
    x, m = sdls.one_batch()
    assert m.shape == (4, 64, 64) and m.dtype == torch.int64 and m.max() < len(EM_CLASSES)
    fig = sdls.show_batch(show=False)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert [p.name for p in data_tour(tmp_path/'tour', size=64, n=2)] == ['pretrain_batch.png', 'segment_batch.png']
    assert (tmp_path/'tour'/'segment_batch.png').stat().st_size > 1000

def test_synth_em_2048():
    img, lbl = synth_em(2048, 0)
    assert img.shape == lbl.shape == (2048, 2048)
    assert set(lbl.unique().tolist()) == set(range(len(EM_CLASSES)))

# ---- several sources at once, and the embedded real EM

def test_pretrain_dls_several_sources(tmp_path):
    "Folders (labelled or not, recursively, masks skipped) and TIFF stacks together; every plane is an image."
    d = tmp_path/'set'
    (d/'images').mkdir(parents=True); (d/'masks').mkdir(); (d/'unlabelled').mkdir()
    for i in range(2):
        png(d/'images'/f's{i}.png', rnd((70, 80), seed=i)); png(d/'masks'/f's{i}.png', np.zeros((70, 80), np.uint8))
    tifffile.imwrite(d/'unlabelled'/'u.tif', rnd((3, 72, 72), seed=5), photometric='minisblack')
    tifffile.imwrite(tmp_path/'stack.tif', rnd((4, 64, 96), np.uint16, seed=6), compression='zlib',
                     photometric='minisblack')
    for data in ([d, tmp_path/'stack.tif'], f"{d},{tmp_path/'stack.tif'}"):
        dls = pretrain_dls(data, size=64, bs=4, valid_pct=0, device='cpu', epoch_len=8)
        assert isinstance(dls.src, EMSources) and len(dls.src) == 2 + 3 + 4
        names = {dls.src.name(i).split('/')[-1] for i in range(len(dls.src))}
        assert names == {'s0.png', 's1.png', *(f'u.tif[{k}]' for k in range(3)),
                         *(f'stack.tif[{k}]' for k in range(4))}
        assert dls.train_ds.carrier == np.float32 and dls.one_batch()[0].shape == (4, 1, 64, 64)
    # a validation split keeps a stack's planes together
    tr, va = split_items(EMSources([d, tmp_path/'stack.tif']), valid_pct=0.4, seed=1)
    src = EMSources([d, tmp_path/'stack.tif'])
    assert not {src.file_of(i) for i in tr} & {src.file_of(i) for i in va}

def test_several_sources_bad_inputs(tmp_path):
    png(tmp_path/'a.png', rnd((64, 64)))
    (tmp_path/'sub').mkdir(); (tmp_path/'sub'/'broken.png').write_bytes(b'\x89PNG garbage')
    with pytest.raises(EMDataError, match=r'broken\.png: cannot read image header'):
        pretrain_dls([tmp_path], size=32, device='cpu')
    with pytest.raises(EMDataError, match=r'nowhere: no such file or folder'):
        pretrain_dls(f"{tmp_path/'a.png'},{tmp_path/'nowhere'}", size=32, device='cpu')
    (tmp_path/'m'/'masks').mkdir(parents=True); png(tmp_path/'m'/'masks'/'x.png', rnd((64, 64)))
    with pytest.raises(EMDataError, match='only masks found'): EMSources(tmp_path/'m')

def test_segment_balance_by_area_kept_by_a_label_subset(tmp_path):
    "Labelled images of two sizes: crops by area; a subset of the labelled images keeps its own weights."
    from affmae.finetune import label_subset
    (tmp_path/'images').mkdir(); (tmp_path/'masks').mkdir()
    for i, side in enumerate((40, 40, 40, 80)):
        png(tmp_path/'images'/f'{i}.png', rnd((side, side), seed=i))
        png(tmp_path/'masks'/f'{i}.png', (rnd((side, side), seed=10 + i) % 2).astype(np.uint8))
    dls = segment_dls(tmp_path, size=32, bs=4, valid_pct=0, device='cpu', epoch_len=4000)
    np.testing.assert_allclose(dls.train_ds.weights, [1/7, 1/7, 1/7, 4/7])
    assert segment_dls(tmp_path, size=32, bs=4, valid_pct=0, device='cpu', balance='slice').train_ds.weights is None
    label_subset(dls, .5, seed=0)
    kept = dls.train_ds.idxs
    assert len(kept) == 2 and len(dls.train_ds.weights) == 2
    draws = np.bincount(dls.train.get_idxs(), minlength=2) / 4000
    want = np.array([4. if j == 3 else 1. for j in kept]); want /= want.sum()
    np.testing.assert_allclose(draws, want, atol=.03)

def test_embedded_podocyte_default():
    "`pretrain_dls()` reads the four podocyte TEM images shipped in the package, with their licence beside them."
    assert (sample_dir()/'LICENSE.md').read_text().startswith('MIT License')
    dls = pretrain_dls(size=128, bs=4, epoch_len=8, device='cpu')
    assert len(dls.src) == 4 and dls.src.shape(0) == (1104, 1024) and dls.train_ds.carrier == np.uint8
    assert len(dls.train_ds.idxs) == 3 and len(dls.valid_ds.idxs) == 1
    set_seed(0)                                      # crops are random: draw 16 of them, reproducibly
    x = torch.cat([dls.one_batch()[0] for _ in range(4)])
    assert x.shape == (16, 1, 128, 128) and abs(x.mean().item()) < 0.5

def test_cli_data_several_ways(tmp_path, capsys):
    "`affmae pretrain --data` takes space-separated, repeated and comma-separated paths, and says how it mixes them."
    from fastcore.script import anno_parser
    from affmae.cli import pretrain, main
    parse = lambda *a: anno_parser(pretrain).parse_args(list(a)).data
    assert parse('--data', 'a', 'b', '--data', 'c,d') == ['a', 'b', 'c,d']
    assert parse() is None
    for i in range(2): png(tmp_path/f'{i}.png', rnd((40, 40), seed=i))
    tifffile.imwrite(tmp_path/'st.tif', rnd((2, 40, 40), seed=3))
    out = tmp_path/'run'
    assert main(['pretrain', '--data', str(tmp_path/'0.png'), str(tmp_path/'1.png'), '--data', str(tmp_path/'st.tif'),
                 '--arch', 'vitmae_tiny', '--img-size', '32', '--bs', '2', '--epochs', '1', '--out', str(out),
                 '--valid-pct', '0', '--balance', 'source']) == 0
    assert (out/'checkpoints'/'epoch_000.safetensors').exists()
    mix = next(l for l in capsys.readouterr().out.splitlines() if l.startswith('crops drawn by source:'))
    assert mix.count('33%') == 3, mix                                 # three paths, one of them a 2-plane stack

def test_balance_by_area_and_source(tmp_path):
    "Training crops come from each slice by its area (default), each path equally ('source'), or each slice equally."
    (tmp_path/'tiles').mkdir()
    for i in range(6): png(tmp_path/'tiles'/f'{i}.png', rnd((40, 40), seed=i))
    tifffile.imwrite(tmp_path/'st.tif', rnd((2, 80, 80), seed=9), photometric='minisblack')
    paths, n = [tmp_path/'tiles', tmp_path/'st.tif'], 6000
    def drawn(balance):
        set_seed(0)
        dls = pretrain_dls(paths, size=32, bs=8, valid_pct=0, epoch_len=n, device='cpu', balance=balance)
        src, idx = dls.src, dls.train.get_idxs()
        ids = dls.train_ds.idxs
        return np.bincount([src.source_of(ids[i % len(ids)]) for i in idx], minlength=2) / n
    np.testing.assert_allclose(drawn('area'), [6/14, 8/14], atol=.03)       # 6 × 40² against 2 × 80²
    np.testing.assert_allclose(drawn('source'), [.5, .5], atol=.03)
    np.testing.assert_allclose(drawn('slice'), [6/8, 2/8], atol=1e-9)       # the plain shuffle: exactly
    with pytest.raises(EMDataError, match="balance='source' applies to folders and files, not shards"):
        pretrain_dls(str(tmp_path/'shard-{000000..000001}.tar'), size=32, balance='source')
