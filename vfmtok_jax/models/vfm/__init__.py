"""Frozen vision foundation models (DINOv2, CLIP, SigLIP) with a multi-level interface."""
