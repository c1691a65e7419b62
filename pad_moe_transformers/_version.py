"""The package version (a leaf module: `checkpoint` and `cli` read it without importing the package root)."""

__version__ = "0.1.0"
