"""Test-only helpers (not part of the nipa package)."""
