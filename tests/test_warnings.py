"The CLI prints no third-party FutureWarning: fastai's deprecated `torch.jit.script` call is silenced, nothing else."
import os, subprocess, sys, warnings

JIT_MSG = '`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.'


def test_cli_prints_no_future_warning():
    cmd = [sys.executable, '-c', 'import sys; from affmae.cli import main; sys.exit(main())', 'finetune', '--help']
    env = {**os.environ, 'PYTHONWARNINGS': 'default'}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'usage:' in r.stdout                              # `finetune --help` imports fastai (through affmae)
    assert 'FutureWarning' not in r.stderr, r.stderr


def test_filter_is_narrow():
    import importlib, affmae
    with warnings.catch_warnings(record=True) as caught:
        importlib.reload(affmae)                   # installs the filter here (pytest resets filters between tests)
        warnings.filterwarnings('always', category=FutureWarning, append=True)   # after affmae's filter
        warnings.warn_explicit(JIT_MSG, FutureWarning, 'torch/jit/_script.py', 1, module='torch.jit._script')
        warnings.warn_explicit(JIT_MSG, FutureWarning, 'user.py', 1, module='user')
        warnings.warn_explicit('another deprecation', FutureWarning, 'torch/jit/_script.py', 2,
                               module='torch.jit._script')
    assert [(str(w.message), w.filename) for w in caught] == [(JIT_MSG, 'user.py'),
                                                            ('another deprecation', 'torch/jit/_script.py')]
