"""trlax.train (see DESIGN.md)."""

if __name__ != "trlax.train":  # pragma: no cover - guard against importing the bare folder
    raise ImportError("import this package as trlax.train (pip install -e .), not as a top-level 'train'")


def __getattr__(name):  # trlax.train.train(algo, ...) and trlax.train.grpo(...) etc. (trlax.train.api), on first use
    import functools
    import importlib
    import importlib.util

    # dunders and submodule names (`from trlax.train import rl` asks here first) are not trainers
    if name.startswith("_") or importlib.util.find_spec(f"trlax.train.{name}") is not None:
        raise AttributeError(f"module 'trlax.train' has no attribute {name!r}")
    api = importlib.import_module("trlax.train.api")
    if name == "train":
        return api.train
    if name in importlib.import_module("trlax.train.registry").names():
        return functools.partial(api.train, name)
    raise AttributeError(f"module 'trlax.train' has no attribute {name!r}")
