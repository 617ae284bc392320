"""Converted pretrained weights shipped with ml_core (data only; see PROVENANCE.md)."""
