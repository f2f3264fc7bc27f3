"""prunekit: learn which structures of a CNN can go, cut them out, retrain what is left."""


def load(directory):
    """A compressed export (spec.json + model.safetensors) as a plain eval-mode model; no pickle."""
    from .compress import load as load_export

    return load_export(directory)


def __getattr__(name):
    """`prunekit.Sparsifier` and `prunekit.from_torchvision`, imported on first use (torch loads slowly)."""
    if name == "Sparsifier":
        from .api import Sparsifier

        return Sparsifier
    if name == "from_torchvision":
        from .models.imports import from_torchvision

        return from_torchvision
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
