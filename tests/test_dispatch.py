"""Backend availability, selection, FASTOPTIM_BACKEND, the custom-op registration and the CLI."""

from __future__ import annotations

import os
import re
import types

import pytest
import torch

import fastoptim
from fastoptim import backends, cli, ops

HAS_CUDA = torch.cuda.is_available()


def test_available_reports_every_backend_with_a_reason():
    status = backends.available()
    assert set(status) == {"cuda", "triton", "torch"}
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason
    if not HAS_CUDA:
        assert not status["cuda"].available
        assert "GPU" in status["cuda"].reason or "not built" in status["cuda"].reason


@pytest.mark.skipif(os.environ.get("FASTOPTIM_CUDA") != "1", reason="extension build not forced (FASTOPTIM_CUDA!=1)")
def test_extension_was_built_when_forced():
    from fastoptim import _C

    assert hasattr(_C, "muon_apply_")
    assert _C.TORCH_VERSION == torch.__version__  # built against the torch that runs it
    if not HAS_CUDA:
        assert "built, but no CUDA GPU" in backends.available()["cuda"].reason


@pytest.mark.parametrize(
    "module, match",
    [
        (types.SimpleNamespace(TORCH_VERSION="2.0.0+cu118"), r"built against torch 2\.0\.0\+cu118, this is torch"),
        (ImportError("_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa"), "built against another torch"),
        (ImportError("No module named 'fastoptim._C'"), "is not built"),
    ],
)
def test_cuda_backend_refuses_an_extension_built_against_another_torch(monkeypatch, module, match):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 1 and name == "" and fromlist and "_C" in fromlist and (globals or {}).get("__name__") == (
            "fastoptim.backends"
        ):
            if isinstance(module, ImportError):
                raise module
            return types.SimpleNamespace(_C=module)
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    status = backends._cuda_status.__wrapped__()
    assert not status.available
    assert re.search(match, status.reason), status.reason
    assert "--no-build-isolation" in status.reason


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FASTOPTIM_BACKEND", raising=False)
    assert backends.select("newton_schulz", "auto", torch.device("cpu")) == "torch"


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error")
def test_explicit_cuda_on_cpu_machine_says_why():
    with pytest.raises(fastoptim.BackendUnavailableError, match="cuda"):
        fastoptim.muon_apply_(torch.randn(3, 4), torch.randn(3, 4), 0.1, backend="cuda")


def test_explicit_backend_error_leaves_tensors_unchanged(monkeypatch):
    monkeypatch.setattr(backends, "_why_not", lambda *a: "a test says no")
    p = torch.randn(3, 4)
    before = p.clone()
    with pytest.raises(fastoptim.BackendUnavailableError, match="a test says no"):
        fastoptim.muon_apply_(p, torch.randn(3, 4), 0.1, weight_decay=0.5, backend="triton")
    assert torch.equal(p, before)


def test_fastoptim_backend_env_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTOPTIM_BACKEND", "torch")
    assert backends.select("muon_apply_", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTOPTIM_BACKEND", "cuda")
    if not HAS_CUDA:
        with pytest.raises(fastoptim.BackendUnavailableError, match="backend 'cuda' cannot run muon_apply_"):
            backends.select("muon_apply_", "auto", torch.device("cpu"))
    # An explicit argument wins over the environment.
    assert backends.select("muon_apply_", "torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTOPTIM_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTOPTIM_BACKEND"):
        backends.select("muon_apply_", "auto", torch.device("cpu"))


def test_missing_kernel_is_reported(monkeypatch):
    import types

    for name in backends.NAMES:
        monkeypatch.setitem(backends._STATUS, name, lambda name=name: backends.BackendStatus(name, True, "pretend"))
    monkeypatch.setattr(backends, "_module", lambda name: types.SimpleNamespace(OPS={}))
    with pytest.raises(fastoptim.BackendUnavailableError, match="no newton_schulz kernel"):
        backends.select("newton_schulz", "cuda", torch.device("cuda"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if HAS_CUDA:
        pytest.skip("a GPU is present: triton is available regardless")
    with pytest.raises(fastoptim.BackendUnavailableError, match="TRITON_INTERPRET"):
        backends.select("newton_schulz", "triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "triton_version, numpy_version, conflict",
    [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False), ("3.2.0", "2.4.0", True),
     (None, "2.4.6", False)],
)
def test_interpreter_conflict_of_old_triton_and_new_numpy(monkeypatch, triton_version, numpy_version, conflict):
    import numpy

    monkeypatch.setattr(backends, "_triton_version", lambda: triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = backends.interpreter_conflict()
    assert (reason is not None) == conflict
    if conflict:
        assert f"triton {triton_version}" in reason and "numpy<2.4" in reason
        status = backends.available()["triton"]
        assert not status.available and "TRITON_INTERPRET=1, but" in status.reason
        with pytest.raises(fastoptim.BackendUnavailableError, match="numpy<2.4"):
            backends.select("newton_schulz", "triton", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# torch.library registration


def opcheck_cases():
    p, u = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    lists = [torch.randn(3, 2), torch.randn(5)]
    jordan = [3.4445, -4.775, 2.0315]
    return [
        (ops._newton_schulz_op, (torch.randn(2, 5, 7), jordan * 2, 1.0, 1e-7, torch.float32, False, "torch")),
        (ops._newton_schulz_op, (torch.randn(7, 5), jordan, 1.01, 1e-7, torch.bfloat16, True, "torch")),
        (ops._muon_momentum_op, (torch.randn(4, 6), torch.randn(4, 6), torch.empty(4, 6), 0.9, "torch")),
        (ops._muon_momentum_op, (torch.randn(4, 6), torch.randn(4, 6), None, 0.9, "torch")),
        (ops._muon_momentum_stack_op, ([torch.randn(4, 6), torch.randn(2, 12)], [torch.randn(4, 6), torch.randn(2, 12)],
                                       torch.empty(2, 4, 6), 0.9, True, True, 1.01, 1e-7, "torch")),
        (ops._muon_apply_op, (p.clone(), u, 0.1, 0.01, 2.0, True, "torch")),
        (ops._normuon_step_op, (p.clone(), u, torch.rand(2, 4), 0.1, 0.01, 0.95, 1e-8, 1.0, True, "torch")),
        (ops._sophia_step_op, ([t.clone() for t in lists], [torch.randn_like(t) for t in lists],
                               [torch.randn_like(t) for t in lists], [torch.rand_like(t) for t in lists],
                               torch.zeros(()), 0.1, 0.9, 0.04, 0.1, 1e-15, "torch")),
        (ops._hessian_ema_op, ([t.abs() for t in lists], [torch.rand_like(t) for t in lists], 0.99, "torch")),
    ]


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_are_registered_under_fastoptim_namespace():
    names = ("newton_schulz", "muon_momentum_", "muon_momentum_stack_", "muon_apply_", "normuon_step_",
             "sophia_step_", "hessian_ema_")
    for name in names:
        assert hasattr(torch.ops.fastoptim, name)


def test_torch_compile_traces_the_ops_without_graph_breaks():
    def step(param, buf, grad):
        update = fastoptim.muon_momentum_(buf, grad, 0.9, True)
        X = fastoptim.newton_schulz(update, compute_dtype=torch.float32)
        fastoptim.muon_apply_(param, X, 0.02, 0.01, 1.0)
        return param

    param, buf, grad = torch.randn(8, 12), torch.zeros(8, 12), torch.randn(8, 12)
    eager = (param.clone(), buf.clone())
    step(*eager, grad)
    explanation = torch._dynamo.explain(step)(param.clone(), buf.clone(), grad)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(param, buf, grad)
    torch.testing.assert_close(param, eager[0])
    torch.testing.assert_close(buf, eager[1])


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastoptim", "torch", "triton", "cuda", "device"):
        assert word in out


def test_cli_demo(capsys):
    assert cli.main(["demo", "--rows", "32", "--cols", "48"]) == 0
    out = capsys.readouterr().out
    assert "polar_express" in out and "you" in out
