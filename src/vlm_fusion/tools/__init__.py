"""Helpers that are not model code (kept out of the flat model folder, so remote-code export never copies them)."""
