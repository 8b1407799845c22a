"""nipa: how analog processing-in-memory non-idealities cost neural-network accuracy, fast."""

__version__ = "0.1.0"

# The Python API (nipa.api), loaded on first use so that `import nipa` stays light.
__all__ = ["simulate", "statistics", "score", "estimate", "Workload"]


def __getattr__(name: str):
    if name in ("simulate", "statistics", "score", "estimate"):
        from nipa import api

        return getattr(api, name)
    if name == "Workload":
        from nipa.workloads.workload import Workload

        return Workload
    raise AttributeError(f"module 'nipa' has no attribute {name!r}")
