"""Stockade: bpf."""
