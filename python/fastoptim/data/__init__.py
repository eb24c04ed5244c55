"""Data files shipped with fastoptim (see PROVENANCE.md)."""
