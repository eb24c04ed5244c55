"""Triton kernels: sophia (not written yet)."""

from __future__ import annotations

OPS: dict = {}
SUPPORTS: dict = {}
