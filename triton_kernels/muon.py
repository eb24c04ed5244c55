"""Triton kernels: muon (not written yet)."""

from __future__ import annotations

OPS: dict = {}
SUPPORTS: dict = {}
