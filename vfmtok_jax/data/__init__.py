"""Data: offline demo photos (and, later, datasets)."""
