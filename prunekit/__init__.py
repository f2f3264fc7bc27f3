"""prunekit: learn which structures of a CNN can go, cut them out, retrain what is left."""
