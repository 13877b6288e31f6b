"""Packaged model and sampler presets (the JSON files of the top-level configs/ folder)."""
