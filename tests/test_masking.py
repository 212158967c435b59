"File-level checks of affmae.masking's contract (the notebook nbs/01_masking.ipynb has the rest)."
import pytest, torch
from affmae.masking import perlin_mask, random_mask, mask_to_ids, coherence, perlin_noise

MASKERS = [perlin_mask, random_mask]
gen = lambda seed=0: torch.Generator().manual_seed(seed)

@pytest.mark.parametrize('masker', MASKERS)
@pytest.mark.parametrize('size,ratio', [(64, .5), (64, .75), ((7, 13), .5), ((7, 13), .75), ((13, 7), .3), (5, .9)])
def test_exact_count(masker, size, ratio):
    h, w = (size, size) if isinstance(size, int) else size
    m = masker(6, size, ratio, generator=gen())
    assert m.shape == (6, h, w) and m.dtype == torch.bool
    assert m.flatten(1).sum(1).tolist() == [round(ratio * h * w)] * 6

@pytest.mark.parametrize('masker', MASKERS)
def test_seeded_and_varied(masker):
    a, b, c = (masker(8, (16, 24), .5, generator=gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(x.flatten().tolist()) for x in a}) == 8        # every sample of the batch differs

def test_generator_device_independent_of_target():
    # numbers are drawn on the generator's device, so the same CPU generator gives the same masks
    # whatever device is named; here both are the CPU but the path through `device=` is exercised
    assert torch.equal(perlin_mask(4, 32, .5, generator=gen(1)),
                       perlin_mask(4, 32, .5, generator=gen(1), device='cpu'))

def test_coherence():
    assert coherence(perlin_mask(32, 64, .5, generator=gen())).mean() >= .85
    assert abs(coherence(random_mask(32, 64, .5, generator=gen())).mean() - .5) < .03

def test_mask_to_ids_round_trip():
    m = perlin_mask(4, (9, 11), .75, generator=gen())
    keep, hid, restore = mask_to_ids(m)
    L, k = 99, round(.75 * 99)
    assert keep.shape == (4, L - k) and hid.shape == (4, k) and restore.shape == (4, L)
    x = torch.randn(4, L, 3)
    take = lambda t, i: t.gather(1, i[..., None].expand(-1, -1, t.shape[-1]))
    assert torch.equal(take(torch.cat([take(x, keep), take(x, hid)], 1), restore), x)
    assert not m.flatten(1).gather(1, keep).any() and m.flatten(1).gather(1, hid).all()

@pytest.mark.parametrize('masker', MASKERS)
@pytest.mark.parametrize('args,msg', [((0, 8, .5), 'n must be'), ((2, 8, 0.), 'ratio must be'),
                                      ((2, 8, 1.), 'ratio must be'), ((2, (8, 0), .5), 'size must be'),
                                      ((2, -4, .5), 'size must be')])
def test_bad_args(masker, args, msg):
    with pytest.raises(ValueError, match=msg): masker(*args)

def test_bad_noise_and_ragged_masks():
    with pytest.raises(ValueError, match='octaves'): perlin_noise(2, 8, octaves=0)
    with pytest.raises(ValueError, match='same number of masked cells'):
        mask_to_ids(torch.tensor([[True, False], [False, False]]))
