"""The parity matrix: every registered kernel of every backend against cpu_ref, one cell per kernel.

Backends come from entry points, so a newly installed plugin's kernels join the matrix by themselves;
a cell that cannot run here is skipped with its reason (no GPU, the kernel's check rejects every case).
"""
import pytest

from nanovllm.core.plugins import load_plugins
from nanovllm.testing.parity import check_kernel_parity, parity_cases

CELLS = list(parity_cases(load_plugins()))


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_kernel_matches_cpu_ref(cell):
    if cell.skip_reason:
        pytest.skip(cell.skip_reason)
    assert check_kernel_parity(cell.backend, cell.impl) > 0
