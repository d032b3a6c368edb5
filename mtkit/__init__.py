"""mtkit: a small, readable machine-translation toolkit."""
__version__ = "0.1.0"
