"""trlax.train (see DESIGN.md)."""

if __name__ != "trlax.train":  # pragma: no cover - guard against importing the bare folder
    raise ImportError("import this package as trlax.train (pip install -e .), not as a top-level 'train'")
