"The published pretraining recipe (decoder, deep supervision, optimisation): a test per fact, then CPU tests."
import math
import pytest, torch
from affmae.aff import create_model
from affmae.mae import PAPER_DECODER, DeformableLayer, idw_sample, patch_targets, masked_mse
from affmae.learner import RECIPES, resolve_recipe, warmup_fraction, warmup_cosine, mae_learner
from affmae.data import pretrain_dls

PAPER = RECIPES['paper']


@pytest.fixture(scope='module')
def base():
    "`affmae_base` with the published decoder (built, never run: the structure is what these tests pin)."
    torch.manual_seed(0)
    return create_model('affmae_base', **PAPER_DECODER)


# decoder and deep supervision
def test_decoder_is_deformable(base): assert all(isinstance(l, DeformableLayer) for l in base.decoder.layers)
def test_decoder_width_384(base): assert base.decoder.dim == 384 and base.decoder.mask_token.shape == (384,)
def test_decoder_6_heads(base):
    assert all(l.cross_attn.heads == 6 and l.self_attn.heads == 6 for l in base.decoder.layers)
def test_decoder_one_block_per_stage(base): assert len(base.decoder.layers) == len(base.encoder.dims) == 4
def test_decoder_coarsest_first(base):
    assert [p.in_features for p in base.decoder.proj] == list(reversed(base.encoder.dims)) == [768, 512, 256, 128]
def test_decoder_4_points_per_head(base): assert all(l.cross_attn.points == 4 for l in base.decoder.layers)
def test_decoder_4_nearest_tokens(base): assert all(l.cross_attn.nearest == 4 for l in base.decoder.layers)
def test_decoder_ffn_768(base): assert all(l.mlp[0].out_features == 768 for l in base.decoder.layers)
def test_decoder_dropout_0_1(base): assert all(l.drop.p == .1 and l.mlp[2].p == .1 for l in base.decoder.layers)
def test_ds_weights_005_012_0_1(): assert tuple(PAPER_DECODER['ds_weights']) == (.05, .12, 0., 1.)
def test_third_head_absent(base):
    assert base.head_names == ['stage3', 'stage2', 'stage0'] and base.loss_weights == (.05, .12, 1.)


# optimisation
def test_adamw_betas(): assert PAPER['betas'] == (.883, .935)
def test_weight_decay(): assert PAPER['wd'] == .05
def test_lr_base(): assert resolve_recipe('paper', 'affmae_base')['lr'] == 2.5e-4
def test_lr_small(): assert resolve_recipe('paper', 'affmae_small')['lr'] == 5e-4
def test_warmup_10000_steps(): assert PAPER['warmup'] == 10_000 and PAPER['schedule'] == 'warmup_cosine'
def test_cosine_to_1e_6(): assert PAPER['lr_min'] == 1e-6
def test_clip_5(): assert PAPER['clip'] == 5.
def test_fp16(): assert PAPER['precision'] == 'fp16'
def test_effective_batch_260(): assert PAPER['batch'] == 260 and resolve_recipe('paper', bs=52)['accum'] == 5
def test_published_run_length(): assert PAPER['ref_steps'] == 500 * math.ceil(187_270 / 52) // 5


# the options, on the CPU
def test_default_recipe_unchanged():
    r = resolve_recipe('affmae', 'affmae_base', bs=8)
    assert (r['lr'], r['wd'], r['betas'], r['clip'], r['precision'], r['accum'], r['schedule'], r['warmup']) == \
           (1.5e-4, .05, (.9, .95), 1., 'bf16', 1, 'one_cycle', .05)


@pytest.mark.parametrize('x', [0., .01, .02, .5, .99])
def test_warmup_cosine_formula(x):
    lr, lo, p = 2.5e-4, 1e-6, .02
    want = lo + (lr - lo) * x / p if x < p else lo + (lr - lo) * (1 + math.cos(math.pi * (x - p) / (1 - p))) / 2
    assert warmup_cosine(lr, lo, p)(x) == pytest.approx(want, rel=1e-6)


def test_warmup_fraction_short_run():
    assert warmup_fraction(10_000, 360_200, 360_200) == pytest.approx(10_000 / 360_200)
    assert warmup_fraction(10_000, 1_000, 360_200) == pytest.approx(10_000 / 360_200)   # same fraction
    assert warmup_fraction(100, 1_000) == .1 and warmup_fraction(.3, 1_000) == .3


def test_mae_learner_paper_recipe():
    dls = pretrain_dls('synthetic', size=32, bs=4, n_synth=8, device='cpu')
    learn = mae_learner(dls, 'vitmae_tiny', recipe='paper', accum=1, lr=1e-3)
    learn.fit_recipe(1, warmup=.5)
    assert learn.opt.opt.param_groups[0]['betas'] == (.883, .935)
    T = len(learn.recorder.lrs)
    assert learn.recorder.lrs == pytest.approx([warmup_cosine(1e-3, 1e-6, .5)(i / T) for i in range(T)], rel=1e-5)
    with pytest.raises(ValueError, match='recipe must be one of'): mae_learner(dls, 'vitmae_tiny', recipe='mae')


def test_zero_weight_means_no_head():
    m = create_model('affmae_tiny', ds_weights=(0., .3, 0., 1.))
    assert len(m.decoder.heads) == 2 and m.head_names == ['stage2', 'stage0']
    img = torch.randn(2, 1, 32, 32)
    out = m(img)
    assert len(out['losses']) == 2
    torch.testing.assert_close(out['loss'], .3 * out['losses'][0] + out['losses'][1])
    torch.testing.assert_close(out['losses'][1], masked_mse(out['pred'], patch_targets(img), out['mask']))
    assert len(m.reconstruct(img)['recons']) == 2


def test_deformable_decoder_trains():
    "A tiny AFFMAE with the published decoder: gradients everywhere, the loss falls on a fixed batch."
    torch.manual_seed(0)
    m = create_model('affmae_tiny', **{**PAPER_DECODER, 'dec_dim': 32, 'dec_heads': 2})
    img = torch.randn(2, 1, 64, 64)   # enough tokens that every stage has several
    mask = m.make_mask(img)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for step in range(6):
        out = m(img, mask)
        opt.zero_grad(); out['loss'].backward()
        if step == 0:
            first = out['loss'].item()
            assert not [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        opt.step()
    assert out['loss'].item() < .97 * first


def test_post_norm():
    torch.manual_seed(0)
    l = DeformableLayer(16, 2).eval()
    x, pos, kpos = torch.randn(1, 5, 16) * 3 + 1, torch.rand(1, 5, 2) * 4, torch.rand(1, 9, 2) * 4
    y = l(x, pos, torch.ones(1, 5, dtype=torch.bool), None, 1., torch.randn(1, 9, 16), kpos,
          torch.ones(1, 9, dtype=torch.bool), None, 1.)
    torch.testing.assert_close(y.mean(-1), torch.zeros(1, 5), atol=1e-5, rtol=0)     # the last op is a LayerNorm
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(1, 5), atol=1e-3, rtol=0)


def test_idw_sample_exact_on_a_token():
    "A sample point on a token reads (almost exactly) that token's value."
    kpos = torch.tensor([[[0., 0.], [3., 0.], [0., 3.], [3., 3.], [9., 9.]]])
    v = torch.arange(5.).view(1, 5, 1, 1)
    out = idw_sample(v, kpos, torch.ones(1, 5, dtype=torch.bool), kpos[:, :1, None, None], torch.ones(1, 1, 1, 1))
    w = 1 / torch.tensor([0., 9., 9., 18., 162.]).add(1e-6).sqrt()[:4]              # the 4 nearest, eps 1e-3
    assert out.item() == pytest.approx((w * torch.arange(4.)).sum().item() / w.sum().item(), rel=1e-5)
    assert out.item() < 2e-3


def test_deformable_decoder_segments():
    "Fine-tuning reuses the published decoder with a query at every patch (`AFFSeg`): per-pixel logits, gradients."
    from affmae.seg_models import AFFSeg
    torch.manual_seed(0)
    seg = AFFSeg(create_model('affmae_tiny', **{**PAPER_DECODER, 'dec_dim': 32, 'dec_heads': 2}), n_classes=3)
    y = seg(torch.randn(1, 1, 64, 64))
    assert y.shape == (1, 3, 64, 64)
    y.square().mean().backward()
    assert all(l.cross_attn.offsets.weight.grad.abs().sum() > 0 for l in seg.decoder.layers)
