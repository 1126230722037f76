"""slimrec: compressed recommendation models served A/B beside the full ones."""

__version__ = "0.1.0"
