"""Sizes that cannot be split, and backends that refuse TP, fail before any worker process starts."""
import multiprocessing

import pytest
import torch
from transformers import Qwen3Config

from nanovllm.core.backend import Backend
from nanovllm.core.config import EngineConfig
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata, StepMetadata
from nanovllm.core.parallel.step_transport import pack_step, step_to_device, unpack_step
from nanovllm.core.parallel.checks import check_tensor_parallel


class GlooBackend(Backend):
    name = "test_gloo"
    dist_backend = "gloo"


def config(tp: int, heads: int = 4, kv_heads: int = 2, intermediate: int = 384) -> EngineConfig:
    hf = Qwen3Config(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                     hidden_size=128, head_dim=32)
    return EngineConfig(model="unused", hf_config=hf, tensor_parallel_size=tp)


@pytest.mark.parametrize("tp, kwargs, message", [
    (3, {}, "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
    (4, dict(heads=8, kv_heads=3, intermediate=384), "num_key_value_heads=3 and tensor_parallel_size=4"),
    (2, dict(intermediate=385), "intermediate_size=385 is not divisible"),
])
def test_sizes_that_do_not_split(tp, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config(tp, **kwargs), GlooBackend())
    assert not multiprocessing.active_children()


def test_fewer_kv_heads_than_ranks_is_allowed():
    check_tensor_parallel(config(4, heads=8, kv_heads=1), GlooBackend())


def test_backend_without_dist_refuses():
    class NoDist(Backend):
        name = "no_dist"
    with pytest.raises(RuntimeError, match="does not support tensor parallelism"):
        check_tensor_parallel(config(2), NoDist())


def test_more_ranks_than_devices_raises():
    class TwoDevices(GlooBackend):
        def device(self, config, rank=0):
            if rank >= 2:
                raise RuntimeError(f"rank {rank} needs device {rank}, but this machine has 2; "
                                   f"lower tensor_parallel_size")
            return torch.device("cpu")
    with pytest.raises(RuntimeError, match="lower tensor_parallel_size"):
        check_tensor_parallel(config(4, heads=8, kv_heads=4), TwoDevices())


def test_packed_step_round_trips():
    meta = StepMetadata(torch.arange(5), 3, PrefillMetadata(torch.tensor([0, 3], dtype=torch.int32),
                                                            torch.tensor([0, 3], dtype=torch.int32), 3, 3),
                        DecodeMetadata(torch.tensor([4, 9], dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32), 9),
                        torch.tensor([2, 3, 4]))
    step = (torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 3, 8]), meta)
    ids, positions, got = step_to_device(unpack_step(pack_step(step)), torch.device("cpu"))
    assert torch.equal(ids, step[0]) and torch.equal(positions, step[1])
    assert torch.equal(got.prefill.cu_seqlens_k, meta.prefill.cu_seqlens_k) and got.prefill.block_tables is None
    assert torch.equal(got.decode.context_lens, meta.decode.context_lens) and got.decode.max_context_len == 9
    assert got.num_prefill_tokens == 3 and torch.equal(got.logits_indices, meta.logits_indices)
    ids[0] = 7  # writable: the worker's broadcast fills it in place
