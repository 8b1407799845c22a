"""nipa: how analog processing-in-memory non-idealities cost neural-network accuracy, fast."""

__version__ = "0.1.0"
