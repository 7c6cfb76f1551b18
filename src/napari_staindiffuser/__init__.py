"""napari-staindiffuser: virtual IHC staining of H&E with StainDiffuser (arXiv 2403.11340).

Importing this package pulls in neither Qt nor torch; the heavy parts are imported by the modules
that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
