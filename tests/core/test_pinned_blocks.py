"""The pinned host blocks reserved at start-up (core/pinned_blocks.py): every size class a step's staged arrays
can fall in, up to the cap. That no step then allocates pinned memory is checked on a GPU
(tests/backends/test_cuda_e2e.py::test_no_kernel_is_compiled_after_start_up)."""
from nanovllm.core.pinned_blocks import (COPIES_LARGE, COPIES_SMALL, LARGEST, SMALL_LIMIT, largest_staged_array,
                                         reservation)


def test_every_power_of_two_class_up_to_the_largest_array():
    largest = largest_staged_array(max_tokens=16384, max_seqs=256, max_blocks_per_seq=64)
    assert largest == 8 * (16384 + 256)  # the per-token int64 arrays, not the 64 KiB block table
    plan = reservation(largest)
    sizes = [size for size, _ in plan]
    assert sizes == [1 << k for k in range(len(sizes))]
    assert sizes[-1] >= largest > sizes[-1] // 2  # the class that holds it, and no larger
    assert all(copies == (COPIES_SMALL if size <= SMALL_LIMIT else COPIES_LARGE) for size, copies in plan)


def test_a_long_block_table_sets_the_largest_class_up_to_the_cap():
    assert largest_staged_array(max_tokens=512, max_seqs=256, max_blocks_per_seq=2560) == 4 * 256 * 2560
    assert reservation(4 * 256 * 2560)[-1][0] == LARGEST  # 2.5 MiB: capped, met as it comes
    assert reservation(1)[-1] == (1, COPIES_SMALL)
    assert reservation(LARGEST)[-1][0] == LARGEST and reservation(LARGEST + 1)[-1][0] == LARGEST
