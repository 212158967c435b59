"Every public module's `forward` has its own docstring, so `show_doc` does not print PyTorch's default one."
import importlib, inspect, pkgutil
import torch.nn as nn
import affmae


def public_modules():
    for info in pkgutil.iter_modules(affmae.__path__):
        if info.name.startswith('_'): continue
        mod = importlib.import_module(f'affmae.{info.name}')
        for name, cls in vars(mod).items():
            if inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == mod.__name__ \
                    and not name.startswith('_') and 'forward' in vars(cls):
                yield f'{mod.__name__}.{name}', cls


def test_forward_docstrings():
    found = dict(public_modules())
    assert 'affmae.aff.AFFBlock' in found
    missing = [n for n, cls in found.items() if not (cls.forward.__doc__ or '').strip()]
    assert missing == [], f'forward without a docstring: {missing}'
