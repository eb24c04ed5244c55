"""The Triton multi-tensor chunk tables (triton_kernels/_common.py): what is cached, for how long, and
what a CUDA graph capture gets.

A stack's slices are stored as byte offsets into the stack, so a bucket's tables do not change when its
Newton-Schulz stack (allocated every step) lands somewhere else; a capture reuses the tables an eager
step built, on any stream, and keeps every table it used for good (the graph holds their addresses).
The capture itself needs a GPU (test_engine's graph tests run the Triton backend there); here the
capture state and the stream are stood in for, and the cache's behaviour is checked directly."""

import pytest
import torch

import fastoptim

pytestmark = pytest.mark.triton

F32 = torch.float32


@pytest.fixture
def common(monkeypatch):
    """fastoptim.triton_kernels._common with empty caches, a settable stream and capture state."""
    from fastoptim.triton_kernels import _common

    monkeypatch.setattr(_common, "_table_cache", type(_common._table_cache)())
    monkeypatch.setattr(_common, "_captured_tables", {})
    monkeypatch.setattr(_common, "_host_rows", {})
    state = {"stream": 1, "capturing": False}
    monkeypatch.setattr(_common, "_current_stream", lambda device: state["stream"])
    monkeypatch.setattr(_common, "_capturing", lambda device: state["capturing"])
    _common.state = state
    yield _common
    del _common.state


def _lists(device, count=3, shape=(5, 7)):
    return ([torch.randn(shape, device=device) for _ in range(count)],
            [torch.randn(shape, device=device) for _ in range(count)])


def _fill_the_cache(common, device):
    """More eager tables than the LRU cache holds, for other tensors (on the current stream)."""
    keep = []
    for _ in range(2 * common.TABLE_CACHE_SIZE):
        lists = _lists(device, count=1)
        keep.append(lists)
        common.chunk_tables(lists, device)
    return keep


def test_eager_tables_are_cached_per_stream_and_evicted_least_recently_used(common, triton_device):
    lists = _lists(triton_device)
    first = common.chunk_tables(lists, triton_device)
    assert common.chunk_tables(lists, triton_device) is first
    common.state["stream"] = 2  # another stream is not ordered after the first one's upload: its own table
    assert common.chunk_tables(lists, triton_device) is not first
    common.state["stream"] = 1
    keep = _fill_the_cache(common, triton_device)
    assert len(common._table_cache) == common.TABLE_CACHE_SIZE
    assert common.chunk_tables(lists, triton_device) is not first  # evicted, built again
    assert keep


def test_a_table_holds_addresses_sizes_and_chunk_indices(common, triton_device):
    big = torch.zeros(common.CHUNK + 3, device=triton_device)  # two chunks
    small = torch.zeros(4, device=triton_device)
    other_big, other_small = torch.zeros_like(big), torch.zeros_like(small)
    [(dtypes, aligned, table)] = common.chunk_tables(([big, small], [other_big, other_small]), triton_device)
    assert dtypes == (F32, F32)
    assert table.cpu().tolist() == [
        [big.data_ptr(), other_big.data_ptr(), big.numel(), 0],
        [big.data_ptr(), other_big.data_ptr(), big.numel(), 1],
        [small.data_ptr(), other_small.data_ptr(), 4, 0],
    ]


def test_a_stack_column_holds_byte_offsets_and_does_not_depend_on_where_the_stack_is(common, triton_device):
    bufs, grads = _lists(triton_device)
    out = torch.empty((3, 5, 7), device=triton_device)
    [(_, _, table)] = common.chunk_tables((bufs, grads, list(out.unbind(0))), triton_device, stacks={2: out})
    assert table[:, 2].cpu().tolist() == [0, 5 * 7 * 4, 2 * 5 * 7 * 4]
    moved = torch.empty((3, 5, 7), device=triton_device)
    assert moved.data_ptr() != out.data_ptr()
    again = common.chunk_tables((bufs, grads, list(moved.unbind(0))), triton_device, stacks={2: moved})
    assert again[0][2] is table
    assert len(common._table_cache) == 1


def test_a_stack_at_an_unaligned_address_is_not_hinted_aligned(common, triton_device):
    bufs, grads = _lists(triton_device, shape=(4, 8))  # 128-byte slices: offsets are all aligned
    storage = torch.empty(3 * 32 + 1, device=triton_device)
    aligned_out = storage[:96].view(3, 4, 8)
    unaligned_out = storage[1:].view(3, 4, 8)  # 4 bytes past an aligned address
    assert aligned_out.data_ptr() % 16 == 0 and unaligned_out.data_ptr() % 16 == 4
    [(_, aligned, table)] = common.chunk_tables((bufs, grads, list(aligned_out.unbind(0))), triton_device,
                                                stacks={2: aligned_out})
    assert aligned is all(t.data_ptr() % 16 == 0 for t in bufs + grads)
    [(_, hinted, same)] = common.chunk_tables((bufs, grads, list(unaligned_out.unbind(0))), triton_device,
                                              stacks={2: unaligned_out})
    assert same is table and hinted is False


def test_the_momentum_and_apply_stacks_reuse_their_tables_when_the_stack_moves(common, triton_device):
    """Two steps whose stacks lie at different addresses build each table once, and compute what the
    torch backend computes from each stack, including one at an address that is not 16-byte aligned."""
    bufs, grads = _lists(triton_device, shape=(8, 12))
    params = [torch.randn(8, 12, device=triton_device) for _ in range(3)]
    storage = torch.empty(2 * 3 * 96 + 1, device=triton_device)
    stacks = [storage[:288].view(3, 8, 12), storage[289:].view(3, 8, 12)]  # the second one unaligned
    assert stacks[1].data_ptr() % 16 == 4
    expected_bufs, expected_params = [b.clone() for b in bufs], [p.clone() for p in params]
    for out in stacks:
        expected = torch.empty_like(out)
        fastoptim.muon_momentum_stack_(expected_bufs, grads, expected, 0.9, True, normalize=True, backend="torch")
        fastoptim.muon_momentum_stack_(bufs, grads, out, 0.9, True, normalize=True, backend="triton")
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
        fastoptim.muon_apply_stack_(expected_params, expected, 0.1, 0.01, backend="torch")
        fastoptim.muon_apply_stack_(params, out, 0.1, 0.01, backend="triton")
        torch.testing.assert_close(params, expected_params, rtol=1e-6, atol=1e-7)
    assert len(common._table_cache) == 2  # (bufs, grads, stack) and (params, stack): one table each


def test_normuon_stack_reuses_its_table_when_the_stack_moves(common, triton_device):
    params = [torch.randn(6, 10, device=triton_device) for _ in range(2)]
    second_moments = [torch.rand(6, device=triton_device) for _ in range(2)]
    expected_params = [p.clone() for p in params]
    expected_moments = [v.clone() for v in second_moments]
    for _ in range(2):
        updates = torch.randn(2, 6, 10, device=triton_device)
        fastoptim.normuon_step_stack_(expected_params, updates, expected_moments, 0.05, 0.01, backend="torch")
        fastoptim.normuon_step_stack_(params, updates.clone(), second_moments, 0.05, 0.01, backend="triton")
        torch.testing.assert_close(params, expected_params, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second_moments, expected_moments, rtol=1e-6, atol=1e-7)
    assert len(common._table_cache) == 1


def test_a_capture_reuses_a_table_an_eager_step_built_on_another_stream_and_keeps_it(common, triton_device):
    lists = _lists(triton_device)
    eager = common.chunk_tables(lists, triton_device)  # the warm-up, on stream 1
    common.state.update(stream=7, capturing=True)  # torch.cuda.graph captures on its own stream
    captured = common.chunk_tables(lists, triton_device)
    assert captured is eager
    common.state.update(stream=1, capturing=False)
    keep = _fill_the_cache(common, triton_device)
    assert common.chunk_tables(lists, triton_device) is eager  # never evicted: the graph reads it
    common.state.update(stream=7, capturing=True)
    assert common.chunk_tables(lists, triton_device) is eager  # a second capture of the same step
    assert keep


def test_a_capture_of_new_tensors_builds_their_table_and_keeps_it(common, triton_device):
    common.state.update(stream=7, capturing=True)
    lists = _lists(triton_device)
    captured = common.chunk_tables(lists, triton_device)
    [(_, _, table)] = captured
    assert table.cpu()[:, 0].tolist() == [t.data_ptr() for t in lists[0]]
    assert common._table_cache == {}  # not in the LRU cache: nothing evicts it
    common.state.update(stream=1, capturing=False)
    keep = _fill_the_cache(common, triton_device)
    common.state.update(stream=7, capturing=True)
    assert common.chunk_tables(lists, triton_device) is captured
    assert keep
    if triton_device.type == "cuda":  # the captured upload reads the pinned rows at every replay
        assert table.data_ptr() in common._host_rows


def test_a_capture_that_cannot_build_a_table_says_to_warm_up_first(common, triton_device, monkeypatch):
    def cannot_pin(*_, **__):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(common, "_build_tables", cannot_pin)
    common.state.update(stream=7, capturing=True)
    with pytest.raises(RuntimeError, match="run the step eagerly once before capturing") as raised:
        common.chunk_tables(_lists(triton_device), triton_device)
    assert "backend='cuda'" in str(raised.value)
    assert "not permitted" in str(raised.value.__cause__)
    assert common._captured_tables == {}
