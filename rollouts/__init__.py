"""trlax.rollouts (see DESIGN.md)."""

if __name__ != "trlax.rollouts":  # pragma: no cover - guard against importing the bare folder
    raise ImportError("import this package as trlax.rollouts (pip install -e .), not as a top-level 'rollouts'")
