"""build_processor: a Ray Data pipeline stage that runs a pool of engine replicas over a Dataset of rows.

    processor = build_processor(ProcessorConfig(model=path, concurrency=4, batch_size=64),
                                preprocess=lambda row: {"question": row["question"], "prompt": row["question"]},
                                postprocess=lambda row: {"question": row["question"], "answer": row["generated_text"]})
    answers = processor(ray.data.read_json("questions.jsonl"))

Preprocess and postprocess run inside the replicas, around each batch: the pipeline is one actor-pool stage
and needs no CPUs beyond what the replicas reserve.

Fault tolerance (Ray's, configured here): a replica whose process dies (killed, out of memory) is restarted up to
`max_restarts` times, rebuilding its LLM, and the batches it held are retried on it up to `max_task_retries`
times; a batch's rows come out only when the whole batch is done, so each row comes out exactly once. A row the
engine refuses (empty, too long, a bad sampling value) is not a failure: its `error` column says why.
"""
import warnings
from collections.abc import Callable

from nanovllm.ray.config import ProcessorConfig
from nanovllm.ray.deps import require_ray
from nanovllm.ray.replica import LLMReplica


class Processor:
    """Callable on a ray.data.Dataset: returns the (lazy) Dataset of its rows with the output columns."""

    def __init__(self, config: ProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                 postprocess: Callable[[dict], dict] | None = None):
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.placement_groups = []  # one per application with tensor parallelism; freed by release()

    def __call__(self, dataset):
        ray = require_ray()
        config = self.config
        if not ray.is_initialized():
            ray.init()
        resources = config.replica_resources(ray.cluster_resources().get("GPU", 0))
        remote_args = {"max_restarts": config.max_restarts, "max_task_retries": config.max_task_retries}
        if config.runtime_env is not None:
            remote_args["runtime_env"] = config.runtime_env
        if config.tensor_parallel_size > 1:
            remote_args["ray_remote_args_fn"] = self._placement_group_args(resources)
        with warnings.catch_warnings():
            # Ray 2.60 deprecates keyword remote args (max_restarts, max_task_retries) and ray_remote_args_fn but
            # names no replacement for them yet; Ray's own LLM processor stage passes them the same way.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            return self._map_replicas(ray, dataset, resources, remote_args)

    def _map_replicas(self, ray, dataset, resources: dict, remote_args: dict):
        config = self.config
        return dataset.map_batches(
            LLMReplica, batch_size=config.batch_size, batch_format="pyarrow", zero_copy_batch=True,
            fn_constructor_kwargs={"model": config.model, "backend": config.backend,
                                   "engine_options": config.engine_options,
                                   "sampling_params": config.sampling_params, "preprocess": self.preprocess,
                                   "postprocess": self.postprocess},
            compute=ray.data.ActorPoolStrategy(size=config.concurrency,
                                               max_tasks_in_flight_per_actor=config.max_tasks_in_flight_per_actor),
            **resources, **remote_args)

    def _placement_group_args(self, resources: dict) -> Callable[[], dict]:
        """Remote args that place each tensor-parallel replica in a bundle of one placement group.

        The engine's tensor-parallel ranks are processes the replica spawns itself (rank 0 is the replica), not
        Ray actors, so all of them must live on the replica's node and use what it reserved. One bundle per
        replica holds every rank's GPU (one per rank) and CPUs; a bundle never spans nodes, and the actor takes
        a whole free bundle (index -1). Ray lists the bundle's GPUs in the actor's CUDA_VISIBLE_DEVICES, which the
        spawned ranks inherit (rank r uses the r-th). The bundles are SPREAD over nodes where they fit, and a
        replica restarted after a crash takes a free bundle again. The group is created once, when Ray Data asks
        for the first replica's args (it may ask more often than it starts replicas), and is gang-scheduled: the
        cluster must hold every replica at once.
        """
        bundle = {k: v for k, v in (("CPU", resources["num_cpus"]), ("GPU", resources["num_gpus"])) if v}
        created = []

        def remote_args() -> dict:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            if not created:
                created.append(placement_group([bundle] * self.config.concurrency, strategy="SPREAD"))
                self.placement_groups.append(created[0])
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                created[0], placement_group_bundle_index=-1, placement_group_capture_child_tasks=True)}
        return remote_args

    def release(self) -> None:
        """Free the placement groups of tensor-parallel replicas once the dataset is consumed (they are also freed
        when the driver exits). Does nothing for replicas without tensor parallelism."""
        if self.placement_groups:
            from ray.util.placement_group import remove_placement_group
            for group in self.placement_groups:
                remove_placement_group(group)
            self.placement_groups.clear()


def build_processor(config: ProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Processor:
    """A Processor over `config`'s replicas: `preprocess` maps each input row to a row the replicas read (prompt or
    messages or prompt_token_ids, plus sampling fields), `postprocess` maps each output row to what you keep.
    Both run inside the replicas, around each batch (so the pipeline needs no CPUs beyond the replicas').
    Ray itself is imported when the processor is applied; a missing Ray is reported here already."""
    require_ray()
    if not isinstance(config, ProcessorConfig):
        raise ValueError(f"build_processor needs a ProcessorConfig; got {type(config).__name__}")
    return Processor(config, preprocess, postprocess)
