"""fastlora's version, readable from every layer (the tuning cache keys its entries by it)."""

__version__ = "0.1.0"
