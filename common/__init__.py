"""What every layer shares, below the data (`pipelines/`) and the trainer (`training/`): the user-error type,
atomic output files, precision settings, CPU shares, fork safety. It imports nothing of the project."""


def flat_items(tree: dict, prefix=""):
    """(dotted key, value) of every leaf of a nested mapping (a config as a plain container)."""
    for k, v in tree.items():
        key = prefix + str(k)
        if isinstance(v, dict):
            yield from flat_items(v, key + ".")
        else:
            yield key, v
