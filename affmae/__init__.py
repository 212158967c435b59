__version__ = "0.1.0"

def create_model(name, **kw):
    "Build a registered model (`aff_*`, `affmae_*`, `vitmae_*`, ...) by name; see `affmae.aff.create_model`."
    from .aff import create_model as _create
    return _create(name, **kw)
