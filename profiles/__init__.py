"""Stockade: profiles."""
