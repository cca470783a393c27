"""Stockade: runtime/cgroups."""
