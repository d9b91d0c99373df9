"""The one check that a set of weights fits a model exactly (names and shapes), shared by
convert (before anything is written) and load (before weights are assigned)."""

from .errors import MlxqError


def _names(names, limit=4):
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights(model, weights: dict, where: str) -> None:
    """``model``'s parameters (already quantized where the weights are) must match
    ``weights`` by name and shape; else one MlxqError starting with ``where``."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    extra = sorted(weights.keys() - expected.keys())
    if missing or extra:
        parts = [f"{what} weights {_names(names)}"
                 for what, names in (("missing", missing), ("unexpected", extra)) if names]
        raise MlxqError(f"{where}: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(v.shape) != tuple(weights[k].shape):
            raise MlxqError(f"{where}: weight {k} has shape {tuple(weights[k].shape)}, "
                            f"the config implies {tuple(v.shape)}")
