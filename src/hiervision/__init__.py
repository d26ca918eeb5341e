"""hiervision: hierarchical image classification — models predict whole paths in a class tree."""

from hiervision.taxonomy import EOS, IGNORE, PAD, Taxonomy, TaxonomyError

__version__ = "0.1.0"
__all__ = ["EOS", "IGNORE", "PAD", "Taxonomy", "TaxonomyError", "__version__"]
