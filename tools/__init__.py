"""Developer tooling kept out of the wheel (``pipeline*`` is what ships): run from the
repository root, e.g. ``python -m tools.docgen``."""
