"""Per-customer inference image builder: customer repo -> resolved models -> reproducible OCI image."""

__version__ = "0.1.0"
