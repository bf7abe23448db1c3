"""One sub-package per API dialect, each a thin layer over the same services."""
