"""Stockade: cri."""
