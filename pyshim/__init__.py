"""pyshim: a CRI runtime service on runc, built for checkpoint and restore."""
__version__ = "0.1.0"
