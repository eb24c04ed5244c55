"""The torchrun example runs end to end (2 CPU ranks, gloo, a few steps)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import _dist_worker as worker  # noqa: E402


@pytest.mark.skipif(not worker.FSDP2_ON_GLOO, reason=worker.FSDP2_ON_GLOO_REASON)
@pytest.mark.timeout(240)
def test_fsdp_normuon_example_trains_under_torchrun():
    # Two CPU ranks on gloo: hide any GPU, or the example picks NCCL and rank 1 asks for a cuda:1 that a
    # one-GPU machine does not have.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "examples" / "fsdp_normuon.py"), "--steps", "11"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=220, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert losses[-1] < losses[0]
    assert "2 rank(s)" in result.stdout and "median step" in result.stdout
