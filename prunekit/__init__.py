"""prunekit: learn which structures of a CNN can go, cut them out, retrain what is left."""


def load(directory):
    """A compressed export (spec.json + model.safetensors) as a plain eval-mode model; no pickle."""
    from .compress import load as load_export

    return load_export(directory)
