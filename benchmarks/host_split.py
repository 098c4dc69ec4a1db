"""HostSplit: where the host's time goes while it launches steps, without a profiler.

Wraps the runner's `launch`, `prepare`, `execute`, the sampler's `launch`, the LM head and each layer's parts with
perf_counter and sums their time per kind of step (the parts nest: a layer's total includes its sub-layers). Used
by profile_prefill.py (`--host-split`: one prefill step, the GPU idle before it) and profile_steps.py
(`--host-split`: every step of the seed workload, pipelined), so a part that waits for the GPU only when the GPU
is busy stands out as the difference between the two.
"""
import time
from collections import defaultdict


class HostSplit:
    def __init__(self, runner):
        self.spent = defaultdict(lambda: defaultdict(float))  # kind -> part -> seconds
        self.steps = defaultdict(int)
        self.kind = "other"
        launch = runner.launch

        def launch_of_kind(batch, prev=None):
            self.kind = "prefill" if batch.is_prefill else "decode"
            self.steps[self.kind] += 1
            return launch(batch, prev)
        runner.launch = launch_of_kind
        self._wrap(runner, "launch", "runner.launch")
        for name in ("prepare", "execute"):
            self._wrap(runner, name, f"runner.{name}")
        self._wrap(runner.sampling, "launch", "sampling.launch")
        model = runner.model
        self._wrap(model, "compute_logits", "model.compute_logits")
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for owner, name, label in (
                    (layer, "forward", "layer"), (layer.input_layernorm, "forward", "input_layernorm"),
                    (layer.post_attention_layernorm, "forward", "post_attention_layernorm"),
                    (attn.qkv_proj, "forward", "qkv_proj"), (attn, "qk_transform_store", "qk_store"),
                    (attn, "qk_transform", "qk_transform"), (attn.attn, "forward", "attention"),
                    (attn.o_proj, "forward", "o_proj"), (mlp.gate_up_proj, "forward", "gate_up_proj"),
                    (mlp.act_fn, "forward", "silu_mul"), (mlp.down_proj, "forward", "down_proj")):
                self._wrap(owner, name, label)

    def _wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[self.kind][label] += time.perf_counter() - start
        setattr(owner, name, timed)

    def print(self, kind: str) -> None:
        steps = max(1, self.steps[kind])
        print(f"host ms per {kind} step ({self.steps[kind]} steps), each part summed over its calls:")
        for label, seconds in sorted(self.spent[kind].items(), key=lambda x: -x[1]):
            print(f"  {label:>26} {seconds * 1000 / steps:8.2f}")
