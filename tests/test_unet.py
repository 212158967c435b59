"The U-Net baseline: shapes, parameter count, learning, and `affmae finetune/predict/evaluate --arch unet` on files."
import json, warnings
import numpy as np, pytest, tifffile, torch
from PIL import Image
from affmae.unet import UNet
from fastai.data.core import DataLoaders
from affmae.synth import synth_em
from affmae.data import segment_dls, EMCrops, EMBatch
from affmae.registry import create_model, list_models
from affmae.checkpoint import load_model
from affmae.seg_models import load_pretrained
from affmae.finetune import seg_learner
from affmae.cli import main

def test_shapes_and_size():
    assert 'unet' in list_models('segmentation')
    assert abs(sum(p.numel() for p in UNet().parameters())/1e6 - 7.77) < 0.01
    torch.manual_seed(0)
    m = create_model('unet', 'segmentation', n_classes=4, width=4, depth=3).eval()
    for shape in [(2, 1, 40, 40), (1, 1, 33, 70), (1, 1, 3, 5)]:
        assert m(torch.randn(shape)).shape == (shape[0], 4, *shape[2:])

def test_learns_a_handful_of_images():
    "Trained on 4 tiny synthetic images, it segments them in eval mode (BatchNorm's running statistics)."
    torch.manual_seed(0)
    d = segment_dls('synthetic', size=48, bs=4, n_synth=4, valid_pct=0, synth_size=48, epoch_len=160, device='cpu',
                    synth_kw=dict(cell=48., mito=(6., 12.)))
    v = d.train.new(dataset=EMCrops(d.src, range(4), 48, train=False, masks=True), shuffle=False, drop_last=False,
                    after_batch=EMBatch(*d.stats, augment=False))             # validated on the same 4 images, whole
    learn = seg_learner(DataLoaders(d.train, v, device='cpu'), 'unet', per_class=False, width=8)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 3e-3)
    assert learn.recorder.values[-1][2] > 0.6, learn.recorder.values

def labelled_folder(d, n=3, size=80):
    (d/'images').mkdir(parents=True); (d/'masks').mkdir()
    for i in range(n):
        img, lbl = synth_em(size, i, cell=48., mito=(6., 12.))
        Image.fromarray((img.numpy()*255).astype(np.uint8)).save(d/'images'/f's{i}.png')
        Image.fromarray((lbl.numpy() > 0).astype(np.uint8)).save(d/'masks'/f's{i}.png')   # two classes
    return d

def test_cli_finetune_predict_evaluate_unet(tmp_path):
    d = labelled_folder(tmp_path/'set')
    run = tmp_path/'run'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(['finetune', '--data', str(d), '--arch', 'unet', '--img-size', '48', '--epochs', '1', '--bs', '2',
                     '--valid-pct', '0.34', '--out', str(run)]) == 0
    model, rec = load_model(run/'seg.safetensors')
    assert isinstance(model, UNet) and rec['arch'] == 'unet' and rec['tile'] == 48
    assert main(['predict', str(run/'seg.safetensors'), str(d/'images'), '--out', str(tmp_path/'pred')]) == 0
    lbl = tifffile.imread(tmp_path/'pred'/'s0_labels.tif')
    assert lbl.shape == (80, 80) and lbl.max() < len(rec['classes'])
    assert main(['evaluate', str(run/'seg.safetensors'), '--data', str(d), '--json-out', str(tmp_path/'s.json')]) == 0
    res = json.loads((tmp_path/'s.json').read_text())
    assert res['n_images'] == 3 and 0 <= res['miou'] <= 1

def test_pretrained_checkpoint_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match='unet has no pretrained encoder'):
        load_pretrained(create_model('unet', 'segmentation'), {'encoder.w': torch.zeros(1)})
    from safetensors.torch import save_file
    save_file({'encoder.w': torch.zeros(1)}, str(tmp_path/'mae.safetensors'))
    assert main(['finetune', '--arch', 'unet', '--pretrained', str(tmp_path/'mae.safetensors'), '--img-size', '32',
                 '--n-synth', '2', '--epochs', '1', '--out', str(tmp_path/'r')]) == 2
    assert 'unet has no pretrained encoder' in capsys.readouterr().err
