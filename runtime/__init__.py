"""Stockade: runtime."""
