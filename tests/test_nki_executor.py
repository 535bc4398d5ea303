"""The NumPy executor of the NKI subset (kernels/nki/executor): the hardware rules it enforces,
its bf16 rounding, and its module structure. The kernels themselves: tests/test_nki_kernels.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.nki import executor

ROOT = Path(__file__).resolve().parents[1]
EXECUTOR = ROOT / "kernels" / "nki" / "executor"
PACKAGE = "kernels.nki.executor"

pytestmark = pytest.mark.skipif(
    executor.real_neuronxcc_present() and not executor.installed(),
    reason="a real neuronxcc is installed; these tests run the NumPy executor in its place")


@pytest.fixture(scope="module")
def nki():
    executor.install()
    import neuronxcc.nki as nki_module

    yield nki_module
    executor.uninstall()


# --- limits -----------------------------------------------------------------------------------
def test_executor_refuses_129_partitions_and_oversize_matmuls(nki):
    nk = nki
    import neuronxcc.nki.isa as nisa
    import neuronxcc.nki.language as nl

    @nk.jit
    def load_rows(a):
        nl.load(a[0:a.shape[0], 0:4])
        return a

    load_rows(np.zeros((128, 4), np.float32))
    with pytest.raises(executor.HardwareLimitError, match="129 partitions"):
        load_rows(np.zeros((129, 4), np.float32))
    with pytest.raises(executor.HardwareLimitError, match="partition"):
        nl.zeros((129, 2), dtype=nl.float32)

    @nk.jit
    def matmul(a, b):
        nisa.nc_matmul(nl.load(a), nl.load(b))
        return a

    matmul(np.ones((128, 128), np.float32), np.ones((128, 512), np.float32))
    for k, m, n in ((128, 129, 8), (128, 8, 513), (64, 8, 8)):
        with pytest.raises(executor.HardwareLimitError, match="nc_matmul"):
            matmul(np.ones((128, m), np.float32), np.ones((k, n), np.float32))

    @nk.jit
    def matmul_from_psum(a):
        product = nisa.nc_matmul(nl.load(a), nl.load(a))  # a PSUM tile
        nisa.nc_matmul(product, nl.load(a))
        return a

    with pytest.raises(executor.HardwareLimitError, match="SBUF"):
        matmul_from_psum(np.ones((8, 8), np.float32))


def test_executor_catches_read_before_write(nki):
    nk = nki
    import neuronxcc.nki.language as nl

    @nk.jit
    def half_written(a, write_all):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        tile = nl.ndarray((8, 4), dtype=nl.float32, buffer=nl.sbuf)
        tile[:, 0:2] = nl.load(a[:, 0:2])
        if write_all:
            tile[:, 2:4] = nl.load(a[:, 2:4])
        nl.store(out, value=nl.exp(tile))
        return out

    a = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    np.testing.assert_allclose(half_written(a, True), np.exp(a), rtol=1e-6)
    with pytest.raises(executor.ReadBeforeWriteError, match="unwritten"):
        half_written(a, False)
    assert np.isnan(nl.ndarray((4, 4), dtype=nl.float32).data).all()  # fresh buffers hold NaN


def test_executor_counts_live_sbuf(nki):
    nk = nki
    import neuronxcc.nki.language as nl

    @nk.jit
    def two_tiles(a, keep_first):
        first = nl.zeros((128, 25_000), dtype=nl.float32)  # 100,000 bytes per partition
        if not keep_first:
            del first
        nl.zeros((128, 25_000), dtype=nl.float32)
        return a

    two_tiles(np.zeros((1, 1), np.float32), False)
    with pytest.raises(executor.HardwareLimitError, match="SBUF overflow"):
        two_tiles(np.zeros((1, 1), np.float32), True)


def test_executor_affine_range_exposes_carried_dependencies(nki):
    nk = nki
    import neuronxcc.nki.language as nl

    @nk.jit
    def running_sum(a, sequential):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        acc = nl.zeros((1, 1), dtype=nl.float32)
        loop = nl.sequential_range if sequential else nl.affine_range
        for i in loop(a.shape[1]):
            acc[...] = nl.add(acc, nl.load(a[0:1, i:i + 1]))
            nl.store(out[0:1, i:i + 1], value=acc)
        return out

    a = np.arange(1, 5, dtype=np.float32)[None]
    np.testing.assert_array_equal(running_sum(a, True), np.cumsum(a)[None])
    assert not np.array_equal(running_sum(a, False), np.cumsum(a)[None])


def test_executor_bf16_rounding_and_counters(nki):
    nk = nki
    import neuronxcc.nki.isa as nisa
    import neuronxcc.nki.language as nl

    from kernels.nki.executor.core import round_bf16

    values = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-9, -(2 + 2.0**-7), 3.0], np.float32)
    np.testing.assert_array_equal(round_bf16(values), np.array([1.0, 1 + 2.0**-7, -2.0, 3.0], np.float32))

    @nk.jit
    def product(a, b):
        out = nl.ndarray((a.shape[1], b.shape[1]), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        nl.store(out, value=nl.copy(nisa.nc_matmul(nl.load(a), nl.load(b)), dtype=nl.bfloat16))
        return out

    rng = np.random.default_rng(1)
    a = rng.standard_normal((128, 64)).astype(np.float32)
    b = rng.standard_normal((128, 32)).astype(np.float32)
    executor.counters.reset()
    out = product(a, b)
    exact = a.astype(np.float64).T @ b
    np.testing.assert_array_equal(out, round_bf16(exact.astype(np.float32)))
    assert np.abs(out - exact).max() > 1e-4  # the rounding is really there
    assert executor.counters.matmul_flops == 2 * 128 * 64 * 32
    assert executor.counters.dma_bytes == (a.size + b.size) * 4 + out.size * 2




def test_executor_refuses_calls_outside_its_subset(nki):
    """A mask= argument (which our kernels never pass) is refused, not run with guessed semantics."""
    import neuronxcc.nki.language as nl

    from kernels.nki.executor.core import OutsideSubsetError

    tile = nl.zeros((4, 4), dtype=nl.float32)
    with pytest.raises(OutsideSubsetError, match="outside the executor's subset"):
        nl.add(tile, tile, mask=True)


# --- no tensor-tensor instruction with both inputs in PSUM ------------------------------------
TWO_TILE_OPS = ("add", "subtract", "multiply", "divide", "maximum", "minimum", "equal", "not_equal",
                "greater_equal", "less")


def _psum_pair(a, b):
    """Two PSUM tiles holding a and b (identity matmuls), for ops that must refuse them."""
    import neuronxcc.nki.isa as nisa
    import neuronxcc.nki.language as nl

    eye = nl.load(_hbm(np.eye(a.shape[0])))
    return nisa.nc_matmul(eye, nl.load(_hbm(a))), nisa.nc_matmul(eye, nl.load(_hbm(b)))


def _hbm(array):
    return executor.hbm_tensor(np.asarray(array, dtype=np.float32))[...]


@pytest.mark.parametrize("name", TWO_TILE_OPS)
def test_two_psum_inputs_are_refused_for_every_nl_op(nki, name):
    """NKI ISA, nki.isa.tensor_tensor: data1 and data2 cannot both reside in PSUM. An nl.* op on two
    tiles is that instruction: refused with both in PSUM, run with one of them copied to SBUF."""
    import neuronxcc.nki.language as nl

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 16)), rng.standard_normal((8, 16)) + 0.5
    b[0, :4] = a[0, :4]  # equal / not_equal see both outcomes
    pa, pb = _psum_pair(a, b)
    op = getattr(nl, name)
    assert pa.buffer == pb.buffer == "psum"
    with pytest.raises(executor.HardwareLimitError, match=rf"nl\.{name}: 2 input tiles in PSUM"):
        op(pa, pb)
    expected = getattr(np, name)(a.astype(np.float32), b.astype(np.float32))
    for x, y in ((nl.copy(pa), pb), (pa, nl.copy(pb))):  # the two legal mixes
        np.testing.assert_allclose(op(x, y, dtype=nl.float32).data, expected, rtol=1e-6)
    column = nl.copy(pb)[:, 0:1]  # a broadcast [P, 1] operand counts too when it is in PSUM
    with pytest.raises(executor.HardwareLimitError, match="PSUM"):
        op(pa, pb[:, 0:1])
    np.testing.assert_allclose(op(pa, column, dtype=nl.float32).data,
                               getattr(np, name)(a.astype(np.float32), b[:, 0:1].astype(np.float32)),
                               rtol=1e-6)


def test_two_psum_inputs_are_refused_for_operators_where_and_nisa(nki):
    import neuronxcc.nki.isa as nisa
    import neuronxcc.nki.language as nl

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 16)), rng.standard_normal((8, 16))
    pa, pb = _psum_pair(a, b)
    for fn in (lambda x, y: x + y, lambda x, y: x - y, lambda x, y: x * y, lambda x, y: x / y,
               lambda x, y: nl.where(nl.greater_equal(nl.copy(x), 0.0), x, y),
               lambda x, y: nisa.tensor_tensor(x, y, nl.add),
               lambda x, y: nisa.scalar_tensor_tensor(data=x, op0=nl.multiply, operand0=2.0, op1=nl.add,
                                                      operand1=y)):
        with pytest.raises(executor.HardwareLimitError, match="input tiles in PSUM"):
            fn(pa, pb)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_allclose(nisa.tensor_tensor(pa, nl.copy(pb), nl.subtract).data, a32 - b32, rtol=1e-6)
    np.testing.assert_allclose(nisa.tensor_tensor(nl.copy(pa), pb, nl.maximum).data, np.maximum(a32, b32))
    fused = nisa.scalar_tensor_tensor(data=pa, op0=nl.multiply, operand0=2.0, op1=nl.add,
                                      operand1=nl.copy(pb))
    np.testing.assert_allclose(fused.data, 2 * a32 + b32, rtol=1e-6)
    np.testing.assert_allclose((pa + nl.copy(pb)).data, a32 + b32, rtol=1e-6)
    with pytest.raises(executor.HardwareLimitError, match="partitions or elements per partition"):
        nisa.tensor_tensor(nl.copy(pa), nl.copy(pb)[0:4, :], nl.add)


def test_what_psum_inputs_stay_legal(nki):
    """tensor_scalar reads a PSUM tile with PSUM [P, 1] operands, and nc_matmul results accumulate
    into a PSUM tile (psum += nc_matmul(...)): both documented, neither refused."""
    import neuronxcc.nki.isa as nisa
    import neuronxcc.nki.language as nl

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((8, 16)), rng.standard_normal((8, 16))
    pa, pb = _psum_pair(a, b)
    out = nisa.tensor_scalar(pa, nl.multiply, pb[:, 0:1], op1=nl.add, operand1=pb[:, 1:2])
    np.testing.assert_allclose(out.data, a * b[:, 0:1] + b[:, 1:2], rtol=1e-5, atol=1e-6)
    acc = nl.zeros((8, 16), dtype=nl.float32, buffer=nl.psum)
    ones = nl.ones((8, 8), dtype=nl.float32)
    acc += nisa.nc_matmul(ones, nl.load(_hbm(a)))
    acc += nisa.nc_matmul(ones, nl.load(_hbm(b)))
    assert acc.buffer == "psum"
    np.testing.assert_allclose(acc.data, np.ones((8, 8)) @ (a + b), rtol=1e-5, atol=1e-5)
    with pytest.raises(executor.HardwareLimitError, match="PSUM"):
        acc += pa  # an older PSUM tile, not the matmul just issued: a Vector Engine add of two PSUM inputs


def test_a_kernel_with_two_psum_inputs_is_refused(nki):
    """What the SSD kernel did before (nl.equal of two matmul results): refused as a whole kernel."""
    import neuronxcc.nki.isa as nisa
    import neuronxcc.nki.language as nl

    @nki.jit
    def equal_counts(start, copy_first):
        out = nl.ndarray((start.shape[0], 1), dtype=nl.float32, buffer=nl.shared_hbm)
        tile = nl.load(start)
        ones = nl.ones((start.shape[0], start.shape[0]), dtype=nl.float32)
        i_p, i_f = nl.arange(start.shape[0])[:, None], nl.arange(start.shape[0])[None, :]
        upper = nisa.affine_select(i_f >= i_p, ones, 0.0)
        upto, total = nisa.nc_matmul(upper, tile), nisa.nc_matmul(ones, tile)
        nl.store(out, value=nl.equal(nl.copy(upto) if copy_first else upto, total, dtype=nl.float32))
        return out

    start = np.zeros((128, 1), np.float32)
    start[[3, 70]] = 1
    np.testing.assert_array_equal(equal_counts(start, True)[:, 0], (np.arange(128) >= 70).astype(np.float32))
    with pytest.raises(executor.HardwareLimitError, match=r"nl\.equal: 2 input tiles in PSUM"):
        equal_counts(start, False)


# --- bf16 --------------------------------------------------------------------------------------
def test_round_bf16_matches_torch_round_to_nearest_even():
    """core.round_bf16 against an independent implementation (torch's float32 -> bfloat16 cast,
    round to nearest even): random values, exact ties both ways, subnormals, overflow, inf, nan."""
    from kernels.nki.executor.core import round_bf16

    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (np.arange(1, 4000, dtype=np.uint32) << 16) | np.uint32(0x8000)  # exactly halfway
    edges = np.array([0.0, -0.0, 1e-40, -1e-40, 3.4e38, -3.4e38, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-9],
                     np.float32)
    values = np.concatenate([bits.view(np.float32), ties.view(np.float32), edges])
    values = values[~np.isnan(values)]
    ours = round_bf16(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    assert np.isnan(round_bf16(np.array([np.nan], np.float32))).all()


# --- module structure: core <- isa <- language, no cycle ---------------------------------------
def _executor_imports(path: Path) -> set[str]:
    """Executor modules a file imports anywhere (top level or inside functions): 'core', 'isa',
    'language', or '__init__' for the package itself."""
    modules = {p.stem for p in EXECUTOR.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the executor package
                base = f"{PACKAGE}.{base}" if base else PACKAGE
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE and isinstance(node, ast.Import):
                found.add("__init__")
            elif name.startswith(PACKAGE + "."):
                found.add(name[len(PACKAGE) + 1:].split(".")[0])
        if isinstance(node, ast.ImportFrom) and names[0] == PACKAGE and not any(
                alias.name in modules for alias in node.names):
            found.add("__init__")  # from kernels.nki.executor import <not a module>
    return found & modules - {path.stem}


def test_executor_import_graph_has_no_cycle():
    graph = {path.stem: _executor_imports(path) for path in EXECUTOR.glob("*.py")}
    assert set(graph) == {"__init__", "core", "isa", "language"}
    assert graph["core"] == set()  # the primitives import nothing else of the executor
    assert graph["isa"] == {"core"} and graph["language"] == {"core", "isa"}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("module", ["kernels.nki.executor.core", "kernels.nki.executor.isa",
                                    "kernels.nki.executor.language", "kernels.nki.executor"])
def test_each_executor_module_imports_first_in_a_fresh_interpreter(module):
    code = (f"import {module} as m, sys; "
            "assert 'neuronxcc' not in sys.modules; "  # importing never installs the executor
            "from kernels.nki.executor import core, isa, language; "
            "assert language.add is not None and isa.nc_matmul is not None and core.elementwise")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
