"""dfx: efficient vision transformers for dense prediction.

The command line (`dfx train|eval|bench|...`) is a thin layer over this package;
every command calls one function that can be used from Python directly.
"""

__version__ = "0.1.0"


def create_model(recipe, overrides=(), weights=None):
    """A task's model from a recipe, run directory or dfx checkpoint, weights loaded, in eval mode.

    See :func:`dfx.models.create_model`; imported lazily so that ``import dfx`` stays light.
    """
    from dfx.models import create_model as create

    return create(recipe, overrides, weights)
