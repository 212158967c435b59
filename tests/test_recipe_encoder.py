"The published AFFMAE recipe's encoder, masking and data options: each published value pinned, each option on the CPU."
import inspect
import numpy as np
import pytest, torch
from affmae.masking import PAPER_LATTICES, coherence, lattice_cells, perlin_quarters_mask, random_mask
from affmae.aff import (MAX_REL_OFFSET, AFFEncoder, ClusterAttention, ConvStem, GlobalAttention, PatchEmbed,
                        RelPosLinear, create_model, global_nbhd, rel_pos_features)
from affmae.merging import n_keep
from affmae.synth import synth_em
from affmae.prep import CLAHE_CLIP, CLAHE_TILES, PAPER_PREP, PAPER_STATS, clahe, full_range, resize_whole
from affmae.data import pretrain_dls, segment_dls


def default(fn, name): return inspect.signature(fn).parameters[name].default


# ---- published values ----
def test_published_lattices(): assert PAPER_LATTICES == (8, 16, 32, 64) == default(perlin_quarters_mask, 'lattices')
def test_published_single_octave(): assert default(perlin_quarters_mask, 'octaves') == 1
def test_published_reference_grid(): assert default(perlin_quarters_mask, 'ref') == 64
def test_published_clahe_clip(): assert CLAHE_CLIP == 4. == default(clahe, 'clip') == PAPER_PREP['clahe']
def test_published_clahe_tiles(): assert CLAHE_TILES == 8 == default(clahe, 'tiles')
def test_published_resize(): assert PAPER_PREP['resize'] == 512
def test_published_mean_std(): assert PAPER_STATS == (0.5562, 0.2396) == PAPER_PREP['norm']
def test_published_offset_clamp(): assert MAX_REL_OFFSET == 255 == default(rel_pos_features, 'max_offset')


def test_published_conv_stem_patch8():
    "Three 3x3 stride-2 convolutions, LayerNorm + GELU between (two norms), widths dim/2, dim/2, dim."
    cs = ConvStem(64, patch=8)
    assert [(c.kernel_size, c.stride, c.out_channels) for c in cs.convs] == [((3, 3), (2, 2), 32),
                                                                             ((3, 3), (2, 2), 32),
                                                                             ((3, 3), (2, 2), 64)]
    assert len(cs.norms) == 2


def test_our_defaults_unchanged():
    enc = AFFEncoder()
    assert (enc.stem, enc.rpe, enc.global_last) == ('linear', 'stage', False) and type(enc.embed) is PatchEmbed
    assert [default(pretrain_dls, k) for k in ('clahe', 'resize', 'norm')] == [None] * 3
    assert [default(segment_dls, k) for k in ('clahe', 'resize', 'norm')] == [None] * 3
    assert default(pretrain_dls, 'augment') is True and default(segment_dls, 'augment') is True


# ---- Perlin quarter-lattice masks ----
@pytest.mark.parametrize('n,size,ratio', [(8, 64, .5), (4, 32, .75), (6, (7, 13), .5), (3, 16, .3), (1, (1, 9), .5)])
def test_quarters_exact_count(n, size, ratio):
    m = perlin_quarters_mask(n, size, ratio, generator=torch.Generator().manual_seed(0))
    h, w = (size, size) if isinstance(size, int) else size
    assert m.shape == (n, h, w) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == round(ratio * h * w)).all()


def test_quarters_published_count_at_recipe():
    "At the recipe's ratio 1/2 on 64x64 the kept count equals the published floor(L * (1 - r))."
    m = perlin_quarters_mask(4, 64, .5, generator=torch.Generator().manual_seed(0))
    assert ((~m).flatten(1).sum(1) == int(4096 * (1 - .5))).all()


def test_quarters_blob_size_falls_with_lattice():
    m = perlin_quarters_mask(32, 64, .5, generator=torch.Generator().manual_seed(1))
    coh = coherence(m).view(4, 8).mean(1)
    assert (coh[:-1] > coh[1:] + .02).all(), coh
    assert abs(coh[-1] - coherence(random_mask(32, 64, .5, generator=torch.Generator().manual_seed(1))).mean()) < .03


def test_quarters_lattice_scales_with_grid():
    assert [lattice_cells(l, 64) for l in PAPER_LATTICES] == [8, 16, 32, 64]
    assert [lattice_cells(l, 128) for l in PAPER_LATTICES] == [16, 32, 64, 128]
    assert [lattice_cells(l, 8) for l in PAPER_LATTICES] == [1, 2, 4, 8]
    assert lattice_cells(8, 2) == 1


def test_quarters_small_batch_uses_coarsest():
    g = lambda: torch.Generator().manual_seed(3)
    a, b = (perlin_quarters_mask(3, 64, .5, generator=g()),
            perlin_quarters_mask(3, 64, .5, lattices=(8,), generator=g()))
    assert torch.equal(a, b)


def test_quarters_seeded():
    g = lambda s: torch.Generator().manual_seed(s)
    m = lambda s: perlin_quarters_mask(8, 64, .5, generator=g(s))
    assert torch.equal(m(5), m(5)) and not torch.equal(m(5), m(6))


def test_quarters_fbm_option():
    "fBM (off in the recipe): octaves on lattices `lacunarity` times finer roughen the blobs; the count stays exact."
    g = lambda: torch.Generator().manual_seed(2)
    one, three = (perlin_quarters_mask(16, 64, .5, lattices=(8,), octaves=o, generator=g()) for o in (1, 3))
    assert (three.flatten(1).sum(1) == 2048).all() and coherence(three).mean() < coherence(one).mean() - .02


@pytest.mark.parametrize('kw,msg', [(dict(n=0), 'n must be'), (dict(ratio=1.), 'ratio must be in (0, 1)'),
                                    (dict(lattices=()), 'lattices must be'),
                                    (dict(lattices=(8, 2.5)), 'lattices must'),
                                    (dict(ref=0), 'ref must be'), (dict(octaves=0), 'octaves must be'),
                                    (dict(lacunarity=0.), 'persistence and lacunarity'),
                                    (dict(size=(0, 4)), 'size must')])
def test_quarters_bad_args(kw, msg):
    args = dict(n=4, size=16, ratio=.5) | kw
    with pytest.raises(ValueError) as e: perlin_quarters_mask(**args)
    assert msg in str(e.value) and '\n' not in str(e.value)


def test_quarters_registered_for_mae():
    from affmae.mae import MASKERS, MAEBase
    assert MASKERS['perlin_quarters'] is perlin_quarters_mask
    mae = MAEBase(mask='perlin_quarters', ratio=.4)
    m = mae.make_mask(torch.zeros(8, 1, 80, 80), torch.Generator().manual_seed(0))
    assert ((~m).flatten(1).sum(1) == mae.n_visible(10, 10)).all()


# ---- encoder options ----
def _batch(seed=0, size=128, ratio=.5):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 1, size, size, generator=g)
    mask = perlin_quarters_mask(2, size // 8, ratio, generator=g)
    mask[1, :1] = True                                                       # ragged batch
    return img, mask


def test_conv_stem_masked_pixels_never_leak():
    torch.manual_seed(0)
    enc = create_model('aff_mini', stem='conv', rpe='block', global_last=True, ds=.5, drop_path=.1).eval()
    img, mask = _batch()
    hidden = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    with torch.no_grad():
        a = enc(img, mask)
        b = enc(torch.where(hidden, 1e3 * torch.randn_like(img), img), mask)
    for x, y in zip(a, b): assert torch.allclose(x.x, y.x, atol=1e-5) and torch.equal(x.pos, y.pos)


def test_conv_stem_tokens_where_patch_embed_puts_them():
    img, mask = _batch()
    with torch.no_grad(): c, l = ConvStem(16)(img, mask), PatchEmbed(16)(img, mask)
    assert torch.equal(c.pos, l.pos) and torch.equal(c.valid, l.valid) and (c.x[~c.valid] == 0).all()


@pytest.mark.parametrize('patch,n', [(2, 1), (4, 2), (16, 4)])
def test_conv_stem_log2_patch_convs(patch, n):
    cs = ConvStem(8, patch=patch)
    assert len(cs.convs) == n
    with torch.no_grad(): t = cs(torch.randn(1, 1, 4 * patch, 4 * patch))
    assert t.x.shape == (1, 16, 8)


def test_conv_stem_bad_patch():
    with pytest.raises(ValueError, match='power-of-2 patch size'): ConvStem(8, patch=12)


def test_rel_pos_features_reading():
    "(dx, dy, |d|, sin, cos) of integer patch offsets, clamped per axis to +-255 before |d|; 0 at d = 0 and padding."
    pos = torch.tensor([[[4., 4.], [4. + 8 * 3, 4. + 8 * 4], [4. + 8 * 300, 4.]]])
    f = rel_pos_features(pos, torch.tensor([[[0, 1, 2, -1]]]), patch=8)
    assert torch.allclose(f[0, 0, 1], torch.tensor([3., 4., 5., .8, .6]))
    assert torch.allclose(f[0, 0, 2], torch.tensor([255., 0., 255., 0., 1.]))
    assert torch.allclose(f[0, 1, 0], torch.tensor([-3., -4., 5., -.8, -.6]))
    assert (f[0, 0, 0] == 0).all() and (f[0, :, 3] == 0).all()


def test_rel_pos_features_round_off_grid():
    pos = torch.tensor([[[0., 0.], [8 * 2.4, -8 * 0.6]]])
    f = rel_pos_features(pos, torch.tensor([[[0, 1]]]), patch=8)
    assert torch.allclose(f[0, 0, 1, :2], torch.tensor([2., -1.]))


def test_rpe_block_one_linear_per_block():
    enc = AFFEncoder(depths=(2, 1, 3, 1), rpe='block')
    assert [len(r) for r in enc.rpes] == [2, 1, 3, 1]
    lin = [m for m in enc.modules() if isinstance(m, RelPosLinear)]
    assert len(lin) == 7 and all(m.proj.in_features == 5 and m.proj.bias is not None for m in lin)
    assert [m.proj.out_features for m in enc.rpes[2]] == [enc.heads[2]] * 3


def test_global_attention_is_one_cluster_of_all_tokens():
    torch.manual_seed(0)
    ga, ca = GlobalAttention(24, 4), ClusterAttention(24, 4, impl='torch')
    ca.load_state_dict(ga.state_dict())
    x, valid = torch.randn(3, 12, 24), torch.arange(12) < torch.tensor([[12], [9], [1]])
    nb, bias = global_nbhd(valid), torch.randn(3, 4, 12, 12)
    with torch.no_grad():
        for b in (None, bias): assert torch.allclose(ga(x, nb, b)[valid], ca(x, nb, b)[valid], atol=1e-5)
        xp = x.masked_fill(~valid[..., None], 1e4)
        assert torch.allclose(ga(xp, nb, bias)[valid], ga(x, nb, bias)[valid], atol=1e-5)


def test_global_last_only_in_last_stage():
    enc = create_model('aff_mini', global_last=True)
    kinds = [{type(b.attn) for b in st} for st in enc.stages]
    assert kinds[:-1] == [{ClusterAttention}] * 3 and kinds[-1] == {GlobalAttention}


@pytest.mark.parametrize('opts', [dict(), dict(stem='conv'), dict(rpe='block'), dict(global_last=True),
                                  dict(stem='conv', rpe='block', global_last=True)])
def test_padding_changes_nothing(opts):
    torch.manual_seed(0)
    enc = create_model('aff_mini', ds=.5, **opts).eval()
    img, mask = _batch(1)
    with torch.no_grad():
        outs = enc(img, mask)
        for b in range(2):
            for o, a in zip(outs, enc(img[b:b + 1], mask[b:b + 1])):
                k = int(a.valid.sum())
                assert torch.allclose(o.x[b, :k], a.x[0, :k], atol=1e-4)


def test_merge_rate_half_and_drop_path():
    torch.manual_seed(0)
    enc = create_model('aff_mini', ds=.5, drop_path=.1, stem='conv', rpe='block')
    assert enc.ds == (.5, .5, .5)
    dps = [b.drop_path.p for st in enc.stages for b in st]
    assert dps[0] == 0 and abs(dps[-1] - .1) < 1e-9 and dps == sorted(dps)
    img, mask = _batch(2)
    outs = enc.train()(img, mask)
    n = (~mask).flatten(1).sum(1)
    for o in outs:
        assert torch.equal(o.valid.sum(1), n)
        n = n_keep(n, .5)
    sum(o.x.square().mean() for o in outs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


@pytest.mark.parametrize('kw,msg', [(dict(stem='vit'), "stem must be 'linear' or 'conv'"),
                                    (dict(rpe='global'), "rpe must be 'stage' or 'block'")])
def test_encoder_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg): AFFEncoder(**kw)


# ---- data options ----
def _low_contrast(size=96, seed=4): return (100 + 20 * synth_em(size, seed=seed)[0].numpy()).astype(np.uint8)


def test_clahe_is_opencv():
    import cv2
    a = _low_contrast()
    assert np.array_equal(clahe(a), cv2.createCLAHE(clipLimit=4., tileGridSize=(8, 8)).apply(a))
    assert np.array_equal(clahe(a, 2., 4), cv2.createCLAHE(clipLimit=2., tileGridSize=(4, 4)).apply(a))


def test_clahe_types_and_contrast():
    a = _low_contrast()
    assert clahe(a).dtype == np.uint8 and clahe(a).std() > 3 * a.std()
    assert clahe(a.astype(np.uint16) * 200).dtype == np.uint16
    assert clahe(a.astype(np.float64) / 7).dtype == np.uint16


@pytest.mark.parametrize('kw,msg', [(dict(clip=0), 'clip > 0'), (dict(tiles=0), 'tiles a positive int')])
def test_clahe_bad_args(kw, msg):
    with pytest.raises(ValueError, match=msg): clahe(_low_contrast(), **kw)


def test_resize_whole_and_full_range():
    a = _low_contrast()
    r = resize_whole(a, 48)
    assert r.shape == (48, 48) and r.dtype == np.uint8 and abs(float(r.mean()) - float(a.mean())) < 1
    lab = np.zeros((96, 64), np.uint8); lab[:, 32:] = 4
    rl = resize_whole(lab, 8, labels=True)
    assert set(np.unique(rl)) == {0, 4} and (rl[:, 4:] == 4).all()
    assert full_range(a) == (0., 255.) and full_range(a.astype(np.uint16)) == (0., 65535.)


def test_pretrain_dls_paper_prep_on_tiny_images():
    dls = pretrain_dls('synthetic', size=64, bs=2, n_synth=2, synth_size=96, valid_pct=0, device='cpu',
                       **{**PAPER_PREP, 'resize': 64})
    assert dls.stats == PAPER_STATS
    ds = dls.train_ds
    x, rng = ds[0]
    ref = resize_whole(clahe(ds.src.image(ds.idxs[0])), 64)
    assert np.array_equal(x[0].numpy(), ref) and torch.equal(rng, torch.tensor([0., 255.]))
    b = dls.one_batch()[0]                                  # both images, in some order and symmetry (dihedral)
    first = ((torch.from_numpy(ref).float() / 255 - PAPER_STATS[0]) / PAPER_STATS[1]).flatten().sort().values
    assert any(torch.allclose(b[i, 0].flatten().sort().values, first, atol=1e-5) for i in range(2))


def test_segment_dls_resizes_masks():
    dls = segment_dls(size=48, bs=2, n_synth=2, synth_size=80, device='cpu', resize=48, norm=PAPER_STATS)
    img, m = dls.one_batch()
    assert img.shape == (2, 1, 48, 48) and m.shape == (2, 48, 48) and int(m.max()) < 5


def test_dls_option_errors():
    with pytest.raises(ValueError, match='smaller than the crop size'):
        pretrain_dls('synthetic', size=64, resize=32, device='cpu')
    with pytest.raises(ValueError, match='norm or stats'):
        pretrain_dls('synthetic', size=32, norm=(0, 1), stats=(0, 1), device='cpu')


def test_pretrain_dls_without_augmentation():
    "The published pretraining does not augment: with augment=False every image arrives unflipped."
    dls = pretrain_dls('synthetic', size=32, bs=4, n_synth=4, synth_size=48, valid_pct=0, device='cpu', augment=False,
                       **{**PAPER_PREP, 'resize': 32})
    ds = dls.train_ds
    imgs = [(torch.from_numpy(ds.image(j)[0]).float() / 255 - PAPER_STATS[0]) / PAPER_STATS[1] for j in ds.idxs]
    for _ in range(3):
        assert all(any(torch.allclose(x[0], im, atol=1e-5) for im in imgs) for x in dls.one_batch()[0])
