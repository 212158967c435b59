"""The `paper` fine-tuning preset pinned to the authors' published recipe (../shared/reference.md, "Published recipe",
fine-tuning): one test per published fact."""
import math
import pytest, torch
from affmae.finetune import FINETUNE_RECIPES, finetune_options, _loss_kw
from affmae.seg_metrics import FocalDiceLoss, seg_loss

P = finetune_options('paper')


def test_focal_loss():
    assert P['loss'] == 'focal_dice' and isinstance(seg_loss(P['loss'], **_loss_kw(P)), FocalDiceLoss)

def test_focal_gamma_2():
    assert P['focal_gamma'] == 2 and seg_loss(P['loss'], **_loss_kw(P)).gamma == 2

def test_class_weights():
    assert tuple(P['class_weights']) == (0.2, 2, 3, 2, 3)        # background, membrane, mitochondria, nucleus, vesicle

def test_dice_without_background():
    assert seg_loss(P['loss'], **_loss_kw(P)).dice_bg is False

def test_peak_lr_1e_4():
    assert P['lr'] == 1e-4

def test_final_lr_1e_8():
    assert P['lr_final'] == 1e-8

def test_25_warmup_epochs_of_700():
    assert P['epochs'] == 700 and math.isclose(P['warmup'] * P['epochs'], 25)

def test_weight_decay_0_0075():
    assert P['wd'] == 0.0075

def test_gradient_clipping_5():
    assert P['clip'] == 5

def test_batch_24_to_32():
    assert 24 <= P['bs'] <= 32

def test_clahe_4_25():
    assert P['clahe'] == 4.25

def test_preset_is_only_option_values():
    "The preset is a dict of `finetune` options, nothing else."
    assert set(FINETUNE_RECIPES['paper']) <= set(finetune_options()) - {'recipe'}

def test_explicit_option_beats_preset():
    assert finetune_options('paper', lr=3e-4)['lr'] == 3e-4 and finetune_options('paper', lr=None)['lr'] == 1e-4

def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'imagenet'"): finetune_options('imagenet')
