"""Estimation without slicing: per-layer bit statistics, the NIPA metric, the injected equivalent error and the
measured layer noise.
"""
