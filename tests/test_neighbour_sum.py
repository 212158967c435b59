"""The fused neighbour weighted sum (run by Triton's interpreter on the CPU, TRITON_INTERPRET=1): random cases with
strided inputs, int32 indices and broadcast gradients against float64; TokenMerging and a small encoder with
impl='triton' against impl='torch', forward and every gradient."""
import copy, os
os.environ.setdefault('TRITON_INTERPRET', '1')   # must be set before the kernels are defined
import pytest, torch
from affmae.aff import AFFEncoder
from affmae.clustering import cluster_tokens
from affmae.masking import perlin_mask
from affmae.merging import TokenMerging
from affmae.neighbour_sum import neighbour_sum, neighbour_sum_ref, triton

pytestmark = pytest.mark.skipif(triton is None, reason='Triton is not installed')
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize('seed', range(6))
def test_random_strided_cases(seed):
    "Random sizes and holes; w a permuted view, x a view with strided rows, int32 or long nb; out.sum() backward."
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    B, K, M, H, N, C = r(1, 2), r(1, 5), [1, 7, 16, 64, 80][r(0, 4)], [1, 2, 5, 16][r(0, 3)], r(1, 30), r(1, 70)
    dtype = (torch.float32, torch.float16)[seed % 2]
    w = torch.rand(B, M, K, H, generator=g).transpose(1, 2)             # (B, K, M, H), not contiguous
    x = torch.randn(B, N, 2 * C, generator=g)[..., ::2].to(dtype)        # rows of stride 2C: copied by the wrapper
    nb = torch.randint(0, N, (B, K, M), generator=g)
    nb[torch.rand(B, K, M, generator=g) < torch.rand((), generator=g)] = -1
    nb[torch.rand(B, K, M, generator=g) < .2] = r(0, N - 1)             # duplicates within and across lists
    if seed % 3 == 0: nb = nb.int()
    ws, xs = w.detach().requires_grad_(), x.detach().requires_grad_()
    wr, xr = w.double().requires_grad_(), x.double().requires_grad_()
    out = neighbour_sum(ws, xs, nb, impl='triton')
    out.float().sum().backward()                                         # a gradient of stride 0
    ref = neighbour_sum_ref(wr, xr, nb)
    ref.sum().backward()
    assert out.dtype == dtype and out.shape == (B, K, H, C)
    for a, b in ((out, ref), (ws.grad, wr.grad), (xs.grad, xr.grad)): assert rel(a, b) < TOL[dtype]


def test_empty():
    "No kept tokens, or no neighbours at all: empty or zero results, no launch on an empty grid."
    w, x = torch.rand(2, 0, 4, 3, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    neighbour_sum(w, x, torch.zeros(2, 0, 4, dtype=torch.long), impl='triton').sum().backward()
    assert x.grad.abs().max() == 0
    w = torch.rand(2, 3, 4, 3)
    assert neighbour_sum(w, x, torch.full((2, 3, 4), -1), impl='triton').abs().max() == 0


def merge_case(seed=0, C=16):
    torch.manual_seed(seed)
    pos, valid = torch.rand(2, 70, 2) * 40, torch.rand(2, 70) > .3
    cl = cluster_tokens(pos, valid, 8, 24)
    return torch.randn(2, cl.order.shape[1], C) * cl.valid[..., None], cl


@pytest.mark.parametrize('autocast', [False, True])
def test_token_merging_triton_matches_torch(autocast):
    "The whole merge, forward and every parameter gradient, with both implementations (autocast: bf16 features)."
    x0, cl = merge_case()
    mg = TokenMerging(16, 24, heads=4)
    res = {}
    for impl in ('torch', 'triton'):
        mg.impl = impl
        mg.zero_grad()
        x = x0.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast): r = mg(x, cl, spacing=2.)
        (r.x.float().square().sum() + r.pos.sum()).backward()
        res[impl] = [r.x, r.pos, x.grad] + [p.grad for p in mg.parameters()]
    assert torch.equal(res['torch'][1], res['triton'][1])               # the same weights: the same positions
    tol = 2e-2 if autocast else 1e-5
    for a, b in zip(res['triton'], res['torch']): assert rel(a, b) < tol


def test_encoder_merges_triton_matches_torch():
    """A small encoder (attention on the torch path) with its merges on each path: every stage and every gradient as
    close to the float64 model as the torch path is (fp32 rounding, amplified through the layers, to ~1e-4)."""
    enc = AFFEncoder(dims=(16, 24, 32), depths=(1, 1, 1), heads=(1, 2, 2), nbhd=16, merge_heads=4, impl='torch')
    img = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    mask = perlin_mask(2, 6, .5, generator=torch.Generator().manual_seed(0))
    res = {}
    for key, impl, dtype in (('torch', 'torch', torch.float32), ('triton', 'triton', torch.float32),
                             ('float64', 'torch', torch.float64)):
        e = copy.deepcopy(enc).to(dtype)
        for m in e.merges: m.impl = impl
        outs = e(img.to(dtype), mask)
        sum(o.x.square().sum() for o in outs).backward()
        res[key] = [o.x for o in outs] + [o.pos for o in outs] + [p.grad for p in e.parameters()]
    err = {k: max(rel(a, b) for a, b in zip(res[k], res['float64'])) for k in ('torch', 'triton')}
    assert err['triton'] < 2 * err['torch'] < 1e-3
