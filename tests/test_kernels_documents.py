"""Document boundaries as any seq_idx spells them, and empty batches, on every CPU path."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference as R

SEQ_IDX = [
    [0, 0, 1, 1, 0, 0, 0, 0, 2, 2, 2, 0],          # a value comes back: still a new document
    [0, 0, 0, 0, 2**32, 2**32, 2**32, 5, 5, 5, 5, 5],  # values beyond int32
]


@pytest.mark.parametrize("rows", SEQ_IDX)
def test_ssd_reads_a_new_document_at_every_change(rows: list[int]) -> None:
    torch.manual_seed(0)
    b, length, h, p, g, n = 1, len(rows), 2, 3, 1, 4
    x = torch.randn(b, length, h, p, dtype=torch.float64)
    dt = torch.rand(b, length, h, dtype=torch.float64) * 0.5 + 0.1
    A = -torch.rand(h, dtype=torch.float64) * 0.5 - 0.1
    B, C = (torch.randn(b, length, g, n, dtype=torch.float64) for _ in range(2))
    seq_idx = torch.tensor([rows], dtype=torch.int64)
    y = kernels.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=4, seq_idx=seq_idx)
    expect, _ = R.ssd_ref(x, dt, A, B, C, seq_idx=seq_idx)
    assert (y - expect).abs().max() < 1e-10


@pytest.mark.parametrize("rows", SEQ_IDX)
@pytest.mark.parametrize("use_c", [True, False])
def test_scan_reads_a_new_document_at_every_change(rows: list[int], use_c: bool, monkeypatch) -> None:
    if not use_c:
        monkeypatch.setenv("MAMBA_KERNELS", "torch")
    torch.manual_seed(0)
    b, d, n, length = 1, 3, 4, len(rows)
    dtype = torch.float32 if use_c else torch.float64  # the C kernel is float32
    u, delta = torch.randn(b, d, length, dtype=dtype), torch.rand(b, d, length, dtype=dtype) + 0.1
    A = -torch.rand(d, n, dtype=dtype) - 0.1
    B, C = (torch.randn(b, n, length, dtype=dtype) for _ in range(2))
    seq_idx = torch.tensor([rows], dtype=torch.int64)
    y = kernels.selective_scan_fn(u, delta, A, B, C, seq_idx=seq_idx)
    expect = R.selective_scan_ref(*(t.double() for t in (u, delta, A, B, C)), seq_idx=seq_idx)
    expect = expect[0] if isinstance(expect, tuple) else expect
    assert (y.double() - expect).abs().max() < (1e-4 if use_c else 1e-10)


def test_document_index_renumbers_by_change() -> None:
    from kernels.dispatch import document_index

    got = document_index(torch.tensor([[7, 7, 2, 2, 7], [0, 1, 2, 3, 3]]))
    assert got.dtype == torch.int32 and got.tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 3, 3]]


def test_empty_batches_and_channels_on_the_c_paths() -> None:
    """Batch 0 / 0 channels: empty outputs, as the torch paths give (the C path used to crash)."""
    u = torch.randn(1, 0, 8)
    y = kernels.selective_scan_fn(u, torch.rand(1, 0, 8), -torch.rand(0, 4), torch.randn(1, 4, 8),
                                  torch.randn(1, 4, 8))
    assert y.shape == (1, 0, 8)
    h, p, n, g, w = 2, 4, 8, 1, 4
    d_inner, conv_dim = h * p, h * p + 2 * g * n
    y = kernels.mamba2_step(torch.randn(0, d_inner + conv_dim + h), torch.zeros(0, conv_dim, w),
                            torch.zeros(0, h, p, n), torch.randn(conv_dim, w), torch.randn(conv_dim),
                            -torch.rand(h), torch.rand(h), torch.rand(h), torch.ones(d_inner))
    assert y.shape == (0, d_inner)
