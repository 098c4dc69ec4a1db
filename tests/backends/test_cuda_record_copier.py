"""The cuda backend's SideStreamCopier (backends/cuda/record_copier.py) against the contract of core/decode_record.py:
a decode step's record is copied while the step before computes, yet never into a record a step launched before
still reads, and never from a host record before its last copy has read it (needs a GPU; skipped without)."""
import time

import pytest
import torch

from nanovllm.core.decode_record import DecodeRecord

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

STEP_CYCLES = 4_000_000  # a step's work before it reads its inputs: ~2 ms of torch.cuda._sleep at ~2 GHz


def steps(num_steps: int, engine_waits: bool):
    """Run `num_steps` fake steps over two records in turn. Each fills its host record with its index, copies it
    through the copier, 'computes' (a sleep kernel) and then reads its device record. With `engine_waits` the host
    waits for step N - 1's end before building step N + 1 (as the engine waits for its tokens), and notes whether
    step N + 1's copy ended while step N was still computing. Returns (what each step read, those notes)."""
    from nanovllm.backends.cuda.record_copier import SideStreamCopier
    dev = torch.device("cuda", torch.cuda.current_device())
    copier = SideStreamCopier(dev)
    host = [DecodeRecord(4, 2, torch.device("cpu"), pin=True) for _ in range(2)]
    device = [DecodeRecord(4, 2, dev) for _ in range(2)]
    seen, ends, overlapped = [], [], []
    torch.cuda.synchronize()
    for step in range(num_steps):
        slot = step % 2
        if engine_waits and step >= 2:
            ends[step - 2].synchronize()
        copier.before_fill(slot)
        host[slot].ids.fill_(step)
        host[slot].tables.fill_(100 + step)
        copier.copy(device[slot], host[slot], 4, slot)
        if engine_waits and step >= 1:
            deadline = time.perf_counter() + 0.001
            while not copier.done[slot].query() and time.perf_counter() < deadline:
                pass
            overlapped.append(copier.done[slot].query() and not ends[step - 1].query())
        torch.cuda._sleep(STEP_CYCLES)
        seen.append((device[slot].ids.clone(), device[slot].tables.clone()))
        ends.append(torch.cuda.Event())
        ends[-1].record()
    torch.cuda.synchronize()
    return [(ids.tolist(), tables.unique().tolist()) for ids, tables in seen], overlapped


def test_a_copy_never_overwrites_a_record_a_step_launched_before_still_reads():
    """The host runs far ahead (no waits): step N + 2's copy into step N's record must wait for step N's read, and
    the host must not rewrite a pinned record its last copy has not read."""
    seen, _ = steps(8, engine_waits=False)
    assert seen == [([step] * 4, [100 + step]) for step in range(8)]


def test_a_copy_runs_while_the_step_before_computes():
    """As the engine runs steps (step N - 1 done when N + 1 is built), step N + 1's copy ends while step N still
    computes: it is no longer queued behind it."""
    seen, overlapped = steps(6, engine_waits=True)
    assert seen == [([step] * 4, [100 + step]) for step in range(6)]
    assert overlapped == [True] * 5
