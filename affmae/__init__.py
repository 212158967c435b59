__version__ = "0.1.0"

import warnings
# fastai's import calls `torch.jit.script`, deprecated in recent torch; silence exactly that message, from torch.jit
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning,
                        module=r'torch\.jit\._script')

def create_model(name, kind=None, **kw):
    "Build a registered model (`aff_*`, `affmae_*`, `vitmae_*`, `unet`) by name; see `affmae.registry.create_model`."
    from .registry import create_model as _create
    return _create(name, kind, **kw)

def load(path, device=None):
    "A pretraining or segmentation checkpoint (a file or run folder), ready on the best device; see `affmae.api.load`."
    from .api import load as _load
    return _load(path, device)
