"""EngineConfig: the engine's options, validated once; every bad value names the field and the fix."""
import os
from dataclasses import dataclass, field, fields

import torch

from nanovllm.core.kv_quant import KV_CACHE_DTYPES, KV_CACHE_SCALES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float": torch.float32, "half": torch.float16}


@dataclass
class EngineConfig:
    """Options of LLM(model, **options). `None` means "the backend or model chooses"."""
    model: str
    backend: str | None = None
    device: str | None = None
    dtype: str | torch.dtype | None = None  # None: the backend's default; "auto": the checkpoint's
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384
    kvcache_block_size: int | None = None
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype), "fp8" (= "fp8_e4m3") or "fp8_e5m2"
    kv_cache_scale: str = "per_head"  # FP8 only: "per_head", "per_tensor" or "unit" (see core/kv_calibration.py)
    num_kvcache_blocks: int | None = None
    enforce_eager: bool = False
    compile: bool | None = None  # fuse small elementwise layers with torch.compile (None: the backend decides)
    async_scheduling: bool = True  # launch decode step N+1 before step N's tokens reach the host
    enable_prefix_caching: bool = True  # share the KV blocks of equal prompt prefixes (vLLM's name)
    tensor_parallel_size: int = 1
    threads: int | None = None  # torch's CPU threads (None: the backend decides; the cpu backend counts free cores)
    kernels: str | dict | None = None  # "reference", {op: kernel name} or "op=name,op=name" (NANOVLLM_KERNELS)
    kernel_plan: str | None = None  # a saved plan (TOML) to replay exactly; fails before any work if it cannot
    verify_kernels: int | None = None  # shadow-verify one call in N per op and shape (NANOVLLM_VERIFY_KERNELS)
    seed: int = 0
    tokenizer: str | None = None
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks)
    skip_tokenizer_init: bool = False  # token-id prompts only; outputs carry no text
    generation_config: str = "auto"  # sampling defaults: "auto" (the model folder's), "none", or a folder
    # the options a backend declares (`Backend.options`, e.g. gpu_memory_utilization), checked at start-up
    backend_options: dict = field(default_factory=dict)
    hf_config: object = field(default=None, repr=False)

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                bad(name, f"expected an integer >= {minimum}")

        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            positive_int(name)
        for name in ("kvcache_block_size", "num_kvcache_blocks", "threads"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.kvcache_block_size is not None and self.kvcache_block_size & (self.kvcache_block_size - 1):
            bad("kvcache_block_size", "expected a power of two (e.g. 16, 32, 256)")
        for name in ("enforce_eager", "async_scheduling", "skip_tokenizer_init", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "expected True or False")
        if self.compile is not None and not isinstance(self.compile, bool):
            bad("compile", "expected True, False or None (the backend decides)")
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        for name in ("backend", "device", "tokenizer"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike) and name == "tokenizer":
                self.tokenizer = value = os.fspath(value)
            if value is not None and not isinstance(value, str):
                bad(name, "expected a string" + (" (a folder or a Hugging Face model id)" if name == "tokenizer"
                                                 else " (e.g. 'cpu', 'cuda:1')" if name == "device" else ""))
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                bad("device", "expected a torch device name like 'cpu', 'cuda' or 'cuda:1'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            bad("seed", "expected an integer in [0, 2**64)")
        if isinstance(self.kernel_plan, os.PathLike):
            self.kernel_plan = os.fspath(self.kernel_plan)
        if self.kernel_plan is not None and not isinstance(self.kernel_plan, str):
            bad("kernel_plan", "expected the path of a saved plan (a TOML file)")
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES and self.dtype != "auto":
                bad("dtype", f"expected one of {sorted(DTYPES)} or 'auto'")
            self.dtype = checkpoint_dtype(self.hf_config) if self.dtype == "auto" else DTYPES[self.dtype]
        elif self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            bad("dtype", "expected a torch.dtype or a name like 'bfloat16'")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"expected one of {', '.join(map(repr, KV_CACHE_DTYPES))}")
        if self.kv_cache_scale not in KV_CACHE_SCALES:
            bad("kv_cache_scale", f"expected one of {', '.join(map(repr, KV_CACHE_SCALES))}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            bad("generation_config", "expected 'auto' (the model folder's generation_config.json), 'none', or a "
                                     "folder holding one")
        if self.load_format not in ("auto", "dummy"):
            bad("load_format", "expected 'auto' (safetensors weights) or 'dummy' (random weights)")
        if self.kernels is None and os.environ.get("NANOVLLM_KERNELS"):
            self.kernels = os.environ["NANOVLLM_KERNELS"]
        if self.kernels is not None and not isinstance(self.kernels, (str, dict)):
            bad("kernels", "expected 'reference' or a dict {op: kernel name}")
        if isinstance(self.kernels, str):
            self.kernels = parse_kernels(self.kernels)
        if isinstance(self.kernels, dict):
            for op, name in self.kernels.items():
                if not isinstance(op, str) or not isinstance(name, str):
                    raise ValueError(f"kernels[{op!r}]={name!r} is invalid: expected a dict of op name -> kernel name, "
                                     f"both strings (e.g. {{'attention.decode': 'triton_paged'}})")
        if self.kernel_plan is not None and self.kernels is not None:
            raise ValueError("kernel_plan and kernels (or NANOVLLM_KERNELS) both choose kernels: give one of them")
        if self.verify_kernels is None and os.environ.get("NANOVLLM_VERIFY_KERNELS"):
            try:
                self.verify_kernels = int(os.environ["NANOVLLM_VERIFY_KERNELS"])
            except ValueError:
                raise ValueError(f"NANOVLLM_VERIFY_KERNELS={os.environ['NANOVLLM_VERIFY_KERNELS']!r} is invalid: "
                                 f"expected an integer N >= 1 (verify one call in N)") from None
        if self.verify_kernels is not None:
            positive_int("verify_kernels")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_num_seqs="
                             f"{self.max_num_seqs}: a decode step of max_num_seqs sequences would not fit; raise it")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("model", "hf_config", "backend_options")]


def checkpoint_dtype(hf_config) -> torch.dtype | None:
    """The dtype config.json records for the weights (`dtype` in transformers 5, `torch_dtype` before), if any."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        return DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None


def parse_kernels(text: str) -> str | dict[str, str]:
    """"reference" -> "reference"; "attention.decode=triton_paged,sampler=torch" -> {op: name}."""
    text = text.strip()
    if text == "reference":
        return text
    choices = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, name = item.partition("=")
        if not sep or not op.strip() or not name.strip():
            raise ValueError(f"kernels={text!r} is invalid: expected 'reference' or 'op=name,op=name' "
                             f"(e.g. 'attention.decode=triton_paged')")
        choices[op.strip()] = name.strip()
    if not choices:
        raise ValueError("kernels='' is invalid: expected 'reference' or 'op=name,op=name'")
    return choices
