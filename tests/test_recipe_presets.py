"""The published AFFMAE model presets (`affmae_*_paper`), one test per published fact (see ../shared/reference.md,
"Published recipe"), and the command line's `--recipe paper` defaults."""
import pytest, torch
from affmae.registry import create_model, list_models
from affmae.mae import PAPER_ENCODER, PAPER_DECODER, PAPER_MASK


@pytest.fixture(scope='module')
def base():
    with torch.device('meta'): return create_model('affmae_base_paper')

def test_registered(): assert {'affmae_base_paper', 'affmae_small_paper', 'affmae_tiny_paper'} <= set(list_models())
def test_widths(base): assert base.encoder.dims == (128, 256, 512, 768)
def test_depths(base): assert base.encoder.depths == (3, 4, 16, 2)
def test_heads(base): assert base.encoder.heads == (4, 8, 16, 24)
def test_mlp_ratio(base): assert base.encoder.stages[0][0].mlp[0].out_features == 3 * 128
def test_neighbourhood(base): assert base.encoder.nbhd == 64
def test_cluster_size(base): assert base.encoder.cluster == 8
def test_patch(base): assert base.encoder.patch == 8
def test_pretraining_merge_rate(base): assert base.encoder.ds == (.5, .5, .5)
def test_conv_stem(base): assert base.encoder.stem == 'conv' and PAPER_ENCODER['stem'] == 'conv'
def test_block_position_bias(base): assert base.encoder.rpe == 'block'
def test_blank_token(base): assert all(b.attn.blank_k is not None for s in base.encoder.stages for b in s)
def test_local_last_stage(base): assert base.encoder.global_last is False
def test_drop_path(): assert PAPER_ENCODER['drop_path'] == .1
def test_decoder_width(): assert (PAPER_DECODER['dec_dim'], PAPER_DECODER['dec_heads']) == (384, 6)
def test_decoder_ffn(): assert PAPER_DECODER['dec_dim'] * PAPER_DECODER['dec_mlp_ratio'] == 768
def test_deformable_points(): assert (PAPER_DECODER['decoder'], PAPER_DECODER['dec_points']) == ('deformable', 4)
def test_interpolation_neighbours(): assert PAPER_DECODER['dec_nearest'] == 4
def test_decoder_dropout(): assert PAPER_DECODER['dec_dropout'] == .1
def test_deep_supervision(base):
    assert PAPER_DECODER['ds_weights'] == (.05, .12, 0., 1.) and tuple(base.loss_weights) == (.05, .12, 1.)
def test_masking(base): assert (base.mask_kind, base.ratio) == ('perlin_quarters', .5) and PAPER_MASK['ratio'] == .5

def test_finetuning_merge_rate():
    m = create_model('affmae_tiny_paper', 'segmentation', n_classes=3)
    assert m.encoder.ds == (.4, .4, .4)

def test_small_and_tiny_share_the_options():
    for name in ('affmae_small_paper', 'affmae_tiny_paper'):
        with torch.device('meta'): m = create_model(name)
        assert (m.encoder.stem, m.encoder.rpe, m.mask_kind) == ('conv', 'block', 'perlin_quarters')

def test_cli_recipe_paper_defaults(tmp_path, monkeypatch):
    """`affmae pretrain --recipe paper` builds affmae_base_paper (here: the tiny preset, named) on the published data;
    its checkpoints record the published image preparation (CLAHE at clip 4, fixed normalisation, full range)."""
    from affmae.cli import main
    from affmae.data import sample_dir
    rc = main(['pretrain', '--recipe', 'paper', '--arch', 'affmae_tiny_paper', '--img_size', '64', '--bs', '2',
               '--epochs', '1', '--epoch_len', '2', '--precision', 'none', '--data', str(sample_dir()),
               '--out', str(tmp_path / 'run'), '--valid_pct', '0.25'])
    assert rc in (0, None)
    from affmae.checkpoint import read_meta, latest_checkpoint
    meta = read_meta(latest_checkpoint(tmp_path / 'run' / 'checkpoints'))
    assert meta['arch'] == 'affmae_tiny_paper' and meta['config']['mask'] == 'perlin_quarters'
    assert (meta['clahe'], meta['pct'], meta['stats']) == (4., None, [0.5562, 0.2396])   # the published preparation
