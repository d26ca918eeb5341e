"""hiervision: hierarchical image classification — models predict whole paths in a class tree."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["EOS", "IGNORE", "PAD", "Taxonomy", "TaxonomyError", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy, so `import hiervision.runtime` / `hiervision.records` works without PyTorch installed
    if name in ("EOS", "IGNORE", "PAD", "Taxonomy", "TaxonomyError"):
        from hiervision import taxonomy

        return getattr(taxonomy, name)
    raise AttributeError(f"module 'hiervision' has no attribute {name!r}")
