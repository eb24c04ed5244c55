"""Backend availability, selection, FASTOPTIM_BACKEND, the custom-op registration and the CLI."""

from __future__ import annotations

import inspect
import os
import re
import types

import pytest
import torch

import fastoptim
from fastoptim import _registry, backends, cli, ops

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
    for name in backends.NAMES:
        monkeypatch.setitem(backends._STATUS, name, lambda name=name: backends.BackendStatus(name, True, "pretend"))
    monkeypatch.setattr(backends, "_module", lambda name: None)
    monkeypatch.setattr(_registry, "_KERNELS", {})  # no backend registered anything
    with pytest.raises(fastoptim.BackendUnavailableError, match="the cuda backend has no newton_schulz kernel"):
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
        (ops._muon_apply_stack_op, ([torch.randn(4, 6), torch.randn(2, 12)], torch.randn(2, 4, 6), 0.1, 0.01, None,
                                    None, 1.5, True, "torch")),
        (ops._muon_apply_stack_op, ([torch.randn(4, 6), torch.randn(2, 12)], torch.randn(2, 4, 6), 0.0, 0.0,
                                    torch.tensor(0.1), torch.tensor(0.01), 1.5, False, "torch")),
        (ops._normuon_step_stack_op, ([torch.randn(4, 6), torch.randn(2, 12)], torch.randn(2, 4, 6),
                                      [torch.rand(4), torch.rand(2, 2)], 0.0, 0.01, torch.tensor(0.1), None, 0.95,
                                      1e-8, 1.0, True, "torch")),
    ]


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_are_registered_under_fastoptim_namespace():
    public = [name for name in ops.__all__ if name != "check_call"]
    assert sorted(_registry.op_specs()) == sorted(public)
    for name, spec in _registry.op_specs().items():
        assert getattr(torch.ops.fastoptim, name).default is spec.op._opoverload
        assert getattr(ops, f"_{name.rstrip('_')}_op") is spec.op


def test_public_functions_keep_their_signatures_and_docstrings():
    assert list(inspect.signature(ops.muon_momentum_).parameters) == ["buf", "grad", "beta", "nesterov", "backend"]
    assert inspect.signature(ops.sophia_step_).parameters["return_unclipped"].default is False
    assert inspect.signature(ops.newton_schulz).parameters["compute_dtype"].default is torch.bfloat16
    for name in _registry.op_specs():
        function = getattr(fastoptim, name)
        assert function.__name__ == name and function.__doc__
        assert inspect.signature(function).parameters["backend"].default == "auto"


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
# The op registry


TRITON_RUNS = backends.available()["triton"].available


def _load_available_backends() -> None:
    for name, status in backends.available().items():
        if status.available:
            backends._module(name)


def test_every_declared_op_has_a_torch_implementation():
    backends._module("torch")
    for name in _registry.op_specs():
        kernel = _registry.kernel(name, "torch")
        assert kernel is not None and callable(kernel.fn), name


def test_every_registered_implementation_names_a_declared_op():
    _load_available_backends()
    registered = _registry.kernels()
    assert {backend for _, backend in registered} >= {"torch"}
    for op, backend in registered:
        assert op in _registry.op_specs() and backend in backends.NAMES, (op, backend)
    if TRITON_RUNS:  # every Triton family registered its kernels when the package was imported
        assert {op for op, backend in registered if backend == "triton"} == set(_registry.op_specs())


def test_registering_an_unknown_op_or_backend_raises(monkeypatch):
    monkeypatch.setattr(_registry, "_KERNELS", dict(_registry._KERNELS))
    with pytest.raises(ValueError, match="'muon_aply_', which is not a declared op"):
        _registry.register_kernel("muon_aply_", "triton")
    with pytest.raises(ValueError, match="backend_name must be one of"):
        _registry.register_kernel("muon_apply_", "tpu")
    backends._module("torch")
    with pytest.raises(ValueError, match="muon_apply_ already has a torch kernel"):
        _registry.register_kernel("muon_apply_", "torch")(lambda *args: None)


def test_a_registered_kernel_is_what_the_op_runs(monkeypatch):
    backends._module("torch")
    monkeypatch.setattr(_registry, "_KERNELS", dict(_registry._KERNELS))
    calls = []
    original = _registry.kernel("muon_apply_", "torch")

    def counting(*args):
        calls.append(args)
        original.fn(*args)

    del _registry._KERNELS[("muon_apply_", "torch")]
    assert _registry.register_kernel("muon_apply_", "torch", supports=original.supports)(counting) is counting
    p = torch.randn(3, 4)
    fastoptim.muon_apply_(p, torch.ones(3, 4), 0.5, backend="torch")
    assert len(calls) == 1 and calls[0][0] is p and calls[0][2:] == (0.5, 0.0, 1.0, False)


@pytest.mark.parametrize(
    "call",
    [
        lambda: fastoptim.muon_apply_(torch.randn(3, 4), torch.randn(3, 4), 0.1, backend="tpu"),
        lambda: fastoptim.hessian_ema_([], [], backend="tpu"),  # an empty list still checks backend
        lambda: ops.check_call("muon_apply_", torch.randn(3, 4), torch.randn(3, 4), 0.1, backend="tpu"),
        lambda: backends.select("muon_apply_", "tpu", torch.device("cpu")),
        lambda: backends.check_backend_name("tpu"),
        lambda: fastoptim.Muon([torch.nn.Parameter(torch.randn(3, 4))], backend="tpu"),
    ],
    ids=["op", "empty-list op", "check_call", "select", "check_backend_name", "optimizer"],
)
def test_one_backend_name_check_everywhere(call):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == "backend must be one of ('auto', 'cuda', 'triton', 'torch'), got 'tpu'"


# ---------------------------------------------------------------------------------------------
# check_call: an op's checks and backend choice, without running it


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def meta_call(op: str, dtype: torch.dtype = torch.float32) -> tuple[tuple, dict]:
    """Valid arguments of `op`, as meta stand-ins of `dtype` (second moments stay float32)."""
    P, m, n = 3, 4, 6
    matrices = [meta(m, n, dtype=dtype) for _ in range(P)]
    stack = meta(P, m, n, dtype=dtype)
    flat = [meta(7, dtype=dtype), meta(2, 5, dtype=dtype)]
    return {
        "newton_schulz": ((stack,), {"compute_dtype": torch.float32}),
        "gram_newton_schulz": ((stack,), {"compute_dtype": torch.float32}),
        "muon_momentum_": ((meta(m, n, dtype=dtype), meta(m, n, dtype=dtype)), {}),
        "muon_momentum_stack_": ((matrices, [meta(m, n, dtype=dtype) for _ in range(P)], stack), {}),
        "muon_apply_": ((meta(m, n, dtype=dtype), meta(m, n, dtype=dtype), 0.1), {"weight_decay": 0.01}),
        "muon_apply_stack_": ((matrices, stack, meta()), {"weight_decay": 0.01}),  # a 0-dim tensor lr
        "normuon_step_": ((meta(m, n, dtype=dtype), meta(m, n, dtype=dtype), meta(m), 0.1), {}),
        "normuon_step_stack_": ((matrices, stack, [meta(m) for _ in range(P)], 0.1), {}),
        "sophia_step_": ((flat, list(flat), list(flat), list(flat), 0.1), {"return_unclipped": True}),
        "hessian_ema_": ((flat, list(flat)), {}),
    }[op]


OP_NAMES = sorted(_registry.op_specs())


@pytest.mark.parametrize("op", OP_NAMES)
def test_check_call_takes_meta_stand_ins_for_every_op(op, monkeypatch):
    monkeypatch.delenv("FASTOPTIM_BACKEND", raising=False)
    args, kwargs = meta_call(op)
    assert ops.check_call(op, *args, backend="auto", device=torch.device("cpu"), **kwargs) == "torch"
    assert ops.check_call(op, *args, backend="torch", **kwargs) == "torch"  # the meta device itself
    if TRITON_RUNS and not HAS_CUDA:  # the interpreter runs CPU tensors
        assert ops.check_call(op, *args, backend="triton", device=torch.device("cpu"), **kwargs) == "triton"


@pytest.mark.parametrize("op", OP_NAMES)
def test_gpu_predicates_take_meta_stand_ins_for_every_op(op, monkeypatch):
    # Pretend the GPU backends run here: with device=cuda, meta stand-ins reach every cuda and Triton
    # predicate, which answer from dtypes and strides alone (no data read).
    pytest.importorskip("fastoptim._C", exc_type=ImportError)
    pytest.importorskip("triton")
    monkeypatch.delenv("FASTOPTIM_BACKEND", raising=False)
    for name in ("cuda", "triton"):
        monkeypatch.setitem(backends._STATUS, name, lambda name=name: backends.BackendStatus(name, True, "pretend"))
    cuda = torch.device("cuda")
    args, kwargs = meta_call(op)
    assert ops.check_call(op, *args, device=cuda, **kwargs) == "cuda"
    assert ops.check_call(op, *args, backend="triton", device=cuda, **kwargs) == "triton"
    args, kwargs = meta_call(op, torch.float64)
    if op in ("newton_schulz", "gram_newton_schulz"):
        kwargs["compute_dtype"] = torch.float64
    assert ops.check_call(op, *args, device=cuda, **kwargs) == "torch"  # neither kernel takes float64


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_check_call_for_cuda_says_the_extension_or_gpu_is_unavailable():
    args, _ = meta_call("muon_apply_stack_")
    with pytest.raises(fastoptim.BackendUnavailableError) as info:
        ops.check_call("muon_apply_stack_", args[0], args[1], 0.1, backend="cuda", device=torch.device("cuda"))
    message = str(info.value)
    assert message.startswith("backend 'cuda' cannot run muon_apply_stack_ here: ")
    assert "fastoptim._C" in message and ("no CUDA GPU" in message or "not built" in message or "rebuild" in message)


@pytest.mark.skipif(not TRITON_RUNS or HAS_CUDA, reason="the Triton interpreter on CPU")
def test_check_call_for_triton_under_the_interpreter():
    params, updates = [meta(4, 6) for _ in range(3)], meta(3, 4, 6)
    assert ops.check_call("muon_apply_stack_", params, updates, 0.1, backend="triton",
                          device=torch.device("cpu")) == "triton"
    wide = [meta(4, 6, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(fastoptim.BackendUnavailableError,
                       match=r"params\[0\] has dtype torch.float64; the Triton kernels take float32"):
        ops.check_call("muon_apply_stack_", wide, updates, 0.1, backend="triton", device=torch.device("cpu"))
    strided = [meta(6, 4).mT for _ in range(3)]
    with pytest.raises(fastoptim.BackendUnavailableError, match="is not contiguous"):
        ops.check_call("muon_apply_stack_", strided, updates, 0.1, backend="triton", device=torch.device("cpu"))


def test_check_call_asks_the_predicates_about_the_device_it_is_given(monkeypatch):
    # Pretend the GPU backends run: the device override (not meta) decides which are asked, and their
    # predicates answer from the stand-ins' dtypes and strides.
    pytest.importorskip("fastoptim._C", exc_type=ImportError)
    pytest.importorskip("triton")
    monkeypatch.delenv("FASTOPTIM_BACKEND", raising=False)
    for name in ("cuda", "triton"):
        monkeypatch.setitem(backends._STATUS, name, lambda name=name: backends.BackendStatus(name, True, "pretend"))
    cuda = torch.device("cuda")
    params, updates, moments = [meta(4, 6) for _ in range(3)], meta(3, 4, 6), [meta(4) for _ in range(3)]
    assert ops.check_call("normuon_step_stack_", params, updates, moments, 0.1, device=cuda) == "cuda"
    half = [meta(4, dtype=torch.bfloat16) for _ in range(3)]  # the cuda kernel takes float32 row moments only
    assert ops.check_call("normuon_step_stack_", params, updates, half, 0.1, device=cuda) == "triton"
    with pytest.raises(fastoptim.BackendUnavailableError, match="its NorMuon kernel takes float32 second_moments"):
        ops.check_call("normuon_step_stack_", params, updates, half, 0.1, backend="cuda", device=cuda)
    wide = [meta(4, dtype=torch.float64) for _ in range(3)]  # neither kernel takes float64
    assert ops.check_call("normuon_step_stack_", params, updates, wide, 0.1, device=cuda) == "torch"
    with pytest.raises(fastoptim.BackendUnavailableError, match="it runs on CUDA tensors, got meta tensors"):
        ops.check_call("normuon_step_stack_", params, updates, moments, 0.1, backend="cuda")
    transposed = [meta(6, 4).mT for _ in range(3)]  # (4, 6) views that are not contiguous: neither kernel takes them
    assert ops.check_call("muon_apply_stack_", transposed, updates, 0.1, device=cuda) == "torch"
    with pytest.raises(fastoptim.BackendUnavailableError, match="its kernels take contiguous tensors"):
        ops.check_call("muon_apply_stack_", transposed, updates, 0.1, backend="cuda", device=cuda)


def test_check_call_runs_nothing_and_changes_nothing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("check_call ran the op")

    monkeypatch.setattr(backends, "implementation", fail)
    p, u = torch.randn(4, 6), torch.randn(4, 6)
    before = p.clone()
    assert ops.check_call("muon_apply_", p, u, 0.1, weight_decay=0.5, backend="torch") == "torch"
    buf = torch.randn(4, 6)
    assert ops.check_call("muon_momentum_", buf.clone(), buf, 0.9) == "torch"
    assert torch.equal(p, before)
    assert ops.check_call("hessian_ema_", [], []) == ""  # an empty call: no backend runs


@pytest.mark.parametrize(
    "op, args, kwargs",
    [
        ("muon_apply_", (meta(4, 6), meta(6, 4), 0.1), {}),
        ("muon_apply_", (meta(4, 6), meta(4, 6), float("nan")), {}),
        ("muon_apply_", (meta(4, 6), meta(4, 6, dtype=torch.int32), 0.1), {}),
        ("muon_apply_stack_", ([meta(4, 6)] * 2, meta(3, 4, 6), 0.1), {}),
        ("muon_apply_stack_", ([meta(4, 6)] * 3, meta(3, 4, 6), meta(2)), {}),
        ("muon_apply_stack_", ([torch.zeros(4, 6)] * 2, torch.zeros(2, 4, 6), 0.1), {}),  # the same param twice
        ("normuon_step_stack_", ([meta(4, 6)] * 3, meta(3, 4, 6), [meta(6)] * 3, 0.1), {}),
        ("newton_schulz", (meta(5),), {}),
        ("newton_schulz", (meta(4, 6),), {"coefficients": "newton"}),
        ("muon_momentum_stack_", ([meta(4, 6)], [meta(4, 6)], meta(1, 4, 6)), {"normalize": 1}),
        ("sophia_step_", ([meta(3)], [meta(3)], [meta(3)], [meta(4)], 0.1), {}),
        ("hessian_ema_", ([meta(3)], [meta(3)]), {"beta2": 1.0}),
        ("hessian_ema_", ([meta(3)], [meta(3)]), {"backend": "gpu"}),
    ],
)
def test_check_call_raises_what_the_op_raises(op, args, kwargs):
    with pytest.raises((TypeError, ValueError)) as from_op:
        getattr(ops, op)(*args, **kwargs)
    with pytest.raises(type(from_op.value)) as from_check:
        ops.check_call(op, *args, **kwargs)
    assert str(from_check.value) == str(from_op.value)


def test_check_call_of_an_unknown_op():
    with pytest.raises(ValueError, match="no fastoptim op is named 'muon_step_'"):
        ops.check_call("muon_step_", meta(4, 6))


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
