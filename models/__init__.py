"""trlax.models (see DESIGN.md)."""

if __name__ != "trlax.models":  # pragma: no cover - guard against importing the bare folder
    raise ImportError("import this package as trlax.models (pip install -e .), not as a top-level 'models'")
