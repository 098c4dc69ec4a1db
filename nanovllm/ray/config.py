"""ProcessorConfig: what each engine replica runs, how many there are, and what each one reserves."""
from dataclasses import dataclass, field

from nanovllm.ray.rows import SAMPLING_FIELDS

GPU_BACKENDS = ("cuda",)


@dataclass
class ProcessorConfig:
    """Settings of `build_processor`, shaped like Ray's own LLM processor configs.

    model            a Hugging Face checkpoint folder readable on every node (None: the embedded default model)
    backend          cuda, cpu_ref, ... (None: each replica's first available backend; GPUs are then reserved
                     when the cluster has any)
    engine_options   LLM options for every replica (max_model_len, tensor_parallel_size, num_kvcache_blocks, ...)
    sampling_params  default SamplingParams fields; a row's own fields override them
    concurrency      the number of engine replicas (Ray actors, one LLM each)
    batch_size       rows per batch handed to a replica; one batch is one LLM.generate call
    num_cpus         CPUs reserved per replica (None: 1 on a GPU backend, else tensor_parallel_size)
    num_gpus         GPUs reserved per replica (None: tensor_parallel_size on a GPU backend, else 0)
    max_restarts     times Ray restarts a replica that died (killed, out of memory); -1 is unlimited
    max_task_retries times a batch whose replica died is retried on the restarted one; -1 is unlimited
    max_tasks_in_flight_per_actor  batches queued on one replica (2 keeps it busy while results travel)
    runtime_env      Ray runtime environment of the replicas (e.g. {"env_vars": {...}})
    """
    model: str | None = None
    backend: str | None = None
    engine_options: dict = field(default_factory=dict)
    sampling_params: dict = field(default_factory=dict)
    concurrency: int = 1
    batch_size: int = 64
    num_cpus: float | None = None
    num_gpus: float | None = None
    max_restarts: int = 4
    max_task_retries: int = 4
    max_tasks_in_flight_per_actor: int = 2
    runtime_env: dict | None = None

    def __post_init__(self):
        for name in ("concurrency", "batch_size", "max_tasks_in_flight_per_actor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProcessorConfig.{name}={value!r} is invalid: expected an integer >= 1")
        for name in ("max_restarts", "max_task_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise ValueError(f"ProcessorConfig.{name}={value!r} is invalid: expected an integer >= 0, "
                                 f"or -1 for unlimited")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"ProcessorConfig.{name}={value!r} is invalid: expected None or a number >= 0")
        if not isinstance(self.engine_options, dict):
            raise ValueError(f"ProcessorConfig.engine_options must be a dict of LLM options; "
                             f"got {type(self.engine_options).__name__}")
        unknown = sorted(set(self.sampling_params) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"ProcessorConfig.sampling_params has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(SAMPLING_FIELDS)}")

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_options.get("tensor_parallel_size", 1))

    def uses_gpus(self, cluster_gpus: float) -> bool:
        """Whether a replica reserves GPUs: on a GPU backend, or with no backend named on a cluster with GPUs
        (where auto-selection picks cuda)."""
        if self.num_gpus is not None:
            return self.num_gpus > 0
        return self.backend in GPU_BACKENDS or (self.backend is None and cluster_gpus > 0)

    def replica_resources(self, cluster_gpus: float = 0) -> dict:
        """{"num_cpus": ..., "num_gpus": ...} one replica reserves: on GPUs one per tensor-parallel rank (all on
        one node), on CPU one core per rank (the rank processes compute in parallel)."""
        tp = self.tensor_parallel_size
        gpus = self.uses_gpus(cluster_gpus)
        num_gpus = self.num_gpus if self.num_gpus is not None else (tp if gpus else 0)
        num_cpus = self.num_cpus if self.num_cpus is not None else (1 if gpus else tp)
        return {"num_cpus": num_cpus, "num_gpus": num_gpus}
