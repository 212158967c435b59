"""The fused LayerNorm (run by Triton's interpreter on the CPU, TRITON_INTERPRET=1): output and every gradient against
float64 over dtypes, widths, row counts, magnitudes and layouts; the drop-in LayerNorm module under autocast; argument
errors."""
import os
os.environ.setdefault('TRITON_INTERPRET', '1')   # must be set before the kernels are defined
import pytest, torch, torch.nn as nn
from affmae.layer_norm import LayerNorm, layer_norm, layer_norm_ref, triton

needs_triton = pytest.mark.skipif(triton is None, reason='Triton is not installed')
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}   # ||a-b||/||b||, by the tensor's dtype
F32 = torch.float32


def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def errors(x, w, b, out_dtype, seed=0, grad='random'):
    """`{name: (relative error, tolerance)}` of the Triton output and gradients against float64, the same (rounded)
    inputs and output gradient given to both; `grad='sum'` backpropagates `y.sum()` (an expanded gradient)."""
    ours = [None if t is None else t.detach().requires_grad_() for t in (x, w, b)]
    refs = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    y = layer_norm(*ours, out_dtype=out_dtype, impl='triton')
    ref = layer_norm_ref(*refs, out_dtype=torch.float64)
    assert y.dtype == out_dtype and y.shape == x.shape
    if grad == 'sum':
        y.float().sum().backward()
        ref.sum().backward()
    else:
        dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out_dtype)
        y.backward(dy)
        ref.backward(dy.double())
    err = {'y': (rel(y, ref), TOL[out_dtype])}
    # fp32 parameters; an output narrower than x makes the backward read x̂ in the output's dtype (saved in place of x)
    narrow = out_dtype.itemsize < x.dtype.itemsize
    tols = (TOL[out_dtype], TOL[out_dtype], TOL[F32]) if narrow else (TOL[x.dtype], TOL[F32], TOL[F32])
    err.update({k: (rel(a.grad, r.grad), tol)
                for k, a, r, tol in zip(('dx', 'dw', 'db'), ours, refs, tols) if a is not None})
    return err


def inputs(shape, x_dtype=F32, scale=1., offset=0., weight=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + offset).to(x_dtype)
    w, b = (torch.randn(shape[-1], generator=g) if on else None for on in (weight, bias))
    return x, w, b


def assert_ok(err): assert all(e < tol for e, tol in err.values()), err


@needs_triton
@pytest.mark.parametrize('x_dtype', list(TOL))
@pytest.mark.parametrize('out_dtype', list(TOL))
def test_dtypes(x_dtype, out_dtype):
    "Every input dtype to every output dtype; C = 130 (no power of two), 10 rows (no multiple of the tile)."
    assert_ok(errors(*inputs((10, 130), x_dtype), out_dtype))


@needs_triton
@pytest.mark.parametrize('R, C', [(1, 1), (3, 3), (5, 33), (9, 130), (13, 384), (6, 768), (4, 1000)])
def test_widths_and_rows(R, C):
    assert_ok(errors(*inputs((R, C)), F32))


@needs_triton
@pytest.mark.parametrize('x_dtype, out_dtype, offset', [(F32, F32, 1e4), (F32, F32, 1e5), (F32, torch.bfloat16, 1e4),
                                                        (torch.bfloat16, torch.bfloat16, 1e4)])
def test_large_magnitude(x_dtype, out_dtype, offset):
    "Rows of mean `offset` and spread 1e3: a one-pass variance would lose the digits, two passes keep them."
    assert_ok(errors(*inputs((10, 130), x_dtype, scale=1e3, offset=offset), out_dtype))


@needs_triton
@pytest.mark.parametrize('weight, bias', [(False, True), (True, False), (False, False)])
def test_no_weight_or_bias(weight, bias):
    err = errors(*inputs((10, 130), weight=weight, bias=bias), torch.bfloat16)
    assert ('dw' in err, 'db' in err) == (weight, bias)
    assert_ok(err)


@needs_triton
@pytest.mark.parametrize('layout', ['3-D', 'transposed', 'permuted', 'row-strided', 'expanded-grad'])
def test_layouts(layout):
    "Leading dimensions, columns of stride > 1 (copied), unmergeable rows, rows of a wider tensor (read in place)."
    x, w, b = inputs((2, 5, 130))
    if layout == 'transposed': x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == 'permuted': x = x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == 'row-strided': x = torch.cat([x, x], -1)[..., :130]
    assert x.is_contiguous() == (layout in ('3-D', 'expanded-grad'))
    assert_ok(errors(x, w, b, F32, grad='sum' if layout == 'expanded-grad' else 'random'))


@needs_triton
@pytest.mark.parametrize('shape', [(0, 130), (2, 0, 130)])
def test_zero_rows(shape):
    "No rows: an empty output, an empty input gradient and zero parameter gradients, nothing launched."
    x, w, b = (t.requires_grad_() for t in inputs(shape))
    y = layer_norm(x, w, b, out_dtype=torch.bfloat16, impl='triton')
    assert y.shape == shape and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.shape == shape
    assert w.grad.abs().max() == 0 and b.grad.abs().max() == 0


@needs_triton
@pytest.mark.parametrize('seed', range(6))
def test_random_cases(seed):
    "Random widths, row counts, scales, dtypes and affine flags (means within 3 spreads of 0: fp32 statistics)."
    g = torch.Generator().manual_seed(100 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    dts, scale = list(TOL), 10. ** r(-2, 2)
    x, w, b = inputs((r(1, 3), r(1, 9), r(3, 300)), dts[r(0, 2)], scale=scale, offset=r(-3, 3) * scale,
                     weight=bool(r(0, 1)), bias=bool(r(0, 1)), seed=seed)
    assert_ok(errors(x, w, b, dts[r(0, 2)], seed=seed))


@needs_triton
def test_deterministic():
    "The parameters' gradients come from partial sums in a fixed order: the same bits on every run."
    x, w, b = inputs((37, 130))
    grads = []
    for _ in range(2):
        ps = [t.clone().requires_grad_() for t in (x, w, b)]
        layer_norm(*ps, out_dtype=torch.bfloat16, impl='triton').float().square().sum().backward()
        grads.append([p.grad for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_auto_is_torch_on_cpu():
    x, w, b = inputs((3, 4, 24))
    assert torch.equal(layer_norm(x, w, b), layer_norm_ref(x, w, b))
    assert torch.equal(layer_norm(x, w, b, impl='torch'), layer_norm_ref(x, w, b))


def test_ref_is_pytorch_layer_norm():
    x, w, b = (t.double() for t in inputs((3, 4, 24)))
    assert rel(layer_norm_ref(x, w, b), nn.functional.layer_norm(x, (24,), w, b)) < 1e-12
    assert layer_norm_ref(x.float(), w, b, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def twins(C, impl='auto'):
    "A `LayerNorm` and an `nn.LayerNorm` of width `C` holding the same random weight and bias."
    ref = nn.LayerNorm(C)
    with torch.no_grad(): ref.weight.normal_(), ref.bias.normal_()
    ln = LayerNorm(C, impl=impl)
    ln.load_state_dict(ref.state_dict())
    return ln, ref


def test_module_state_dict():
    "The same keys as nn.LayerNorm's, in each configuration, and nn.LayerNorm's checkpoints load."
    for kw in ({}, dict(bias=False), dict(elementwise_affine=False)):
        assert list(LayerNorm(16, **kw).state_dict()) == list(nn.LayerNorm(16, **kw).state_dict())
    ln, ref = twins(16)
    assert all(torch.equal(a, b) for a, b in zip(ln.state_dict().values(), ref.state_dict().values()))
    assert ln.weight.dtype == F32 and ln.eps == ref.eps


@pytest.mark.parametrize('impl', ['torch', pytest.param('triton', marks=needs_triton)])
def test_module_without_autocast_matches_nn(impl):
    ln, ref = twins(48, impl)
    x = torch.randn(2, 5, 48)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ln(xa), ref(xb)
    assert ya.dtype == F32 and rel(ya, yb) < 1e-6
    ya.square().sum().backward()
    yb.square().sum().backward()
    for a, b in ((xa.grad, xb.grad), (ln.weight.grad, ref.weight.grad), (ln.bias.grad, ref.bias.grad)):
        assert rel(a, b) < 1e-5
    xh = x.half()
    assert ln.half()(xh).dtype == torch.float16                       # fp16 module, fp16 input: fp16 out


@pytest.mark.parametrize('impl', ['torch', pytest.param('triton', marks=needs_triton)])
def test_module_under_autocast(impl):
    "Autocast bf16: a bf16 output with nn.LayerNorm's values, fp32 gradients for the fp32 input and parameters."
    ln, ref = twins(48, impl)
    x = torch.randn(4, 7, 48)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ya = ln(xa)
        yb = ref(xb)
        za = nn.functional.linear(ya, torch.ones(3, 48))
    assert (ya.dtype, yb.dtype, za.dtype) == (torch.bfloat16, F32, torch.bfloat16)
    assert rel(ya, yb) < 1e-2
    ya.float().square().sum().backward()
    yb.bfloat16().float().square().sum().backward()
    for a, b in ((xa.grad, xb.grad), (ln.weight.grad, ref.weight.grad), (ln.bias.grad, ref.bias.grad)):
        assert a.dtype == F32 and rel(a, b) < 1e-2
    assert ln.weight.dtype == ln.bias.dtype == F32
    with torch.autocast('cpu', dtype=torch.float16):
        assert ln(x).dtype == torch.float16


def test_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    cases = [(lambda: layer_norm(x, w[:6], None), ValueError, 'weight must be (C,) = (8,)'),
             (lambda: layer_norm(x, None, torch.zeros(8, dtype=torch.long)), TypeError, 'bias must be floating point'),
             (lambda: layer_norm(x, 'w', None), TypeError, 'weight must be a torch.Tensor or None'),
             (lambda: layer_norm(x.long(), w, None), TypeError, 'x must be floating point'),
             (lambda: layer_norm(x.tolist(), w, None), TypeError, 'x must be a torch.Tensor'),
             (lambda: layer_norm(x[:, :0], None, None), ValueError, 'C > 0'),
             (lambda: layer_norm(torch.tensor(1.), None, None), ValueError, 'C > 0'),
             (lambda: layer_norm(x, w, None, out_dtype=torch.int8), TypeError, 'out_dtype must be'),
             (lambda: layer_norm(x, w, None, impl='cuda'), ValueError, 'impl must be'),
             (lambda: LayerNorm((4, 8)), ValueError, 'last dimension only'),
             (lambda: LayerNorm(8, impl='fast'), ValueError, 'impl must be')]
    if triton is not None:
        cases += [(lambda: layer_norm(x.double(), w, None, impl='triton'), TypeError, 'unsupported dtype'),
                  (lambda: layer_norm(x, w.double(), None, impl='triton'), TypeError, 'unsupported dtype'),
                  (lambda: layer_norm(x, w, None, out_dtype=torch.float64, impl='triton'), TypeError,
                   'unsupported dtype'),
                  (lambda: layer_norm(torch.randn(1, (1 << 16) + 1), None, None, impl='triton'), ValueError,
                   'unsupported width')]
    for f, exc, msg in cases:
        with pytest.raises(exc) as e: f()
        assert msg in str(e.value) and '\n' not in str(e.value)


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    if triton is None: pytest.skip('Triton is not installed')
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(ValueError, match='needs CUDA tensors'):
        layer_norm(torch.randn(2, 8), None, None, impl='triton')
