"""How many threads torch's CPU pool gets: the cores this process may use that other work leaves free.

torch's default is every core; on a machine that is busy with other work, threads that wait on each
other at every operation then run many times slower than fewer threads would (measured on a busy 2-core
machine: 3 tokens/s with 2 threads, 24 with 1). The choice, first that applies:
  1. the engine option `threads` (CLI `--threads`);
  2. OMP_NUM_THREADS, when the user set it;
  3. the cores in this process's affinity mask minus the load average's other runnable work.
"""
import os

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)


def allowed_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def free_cores(cores: int, load_average: float) -> int:
    """Cores left for us: `cores` minus the runnable work of others (the 1-minute load average, less the one
    core this process is itself keeping busy while it loads the model), at least 1."""
    others = max(0.0, load_average - 1.0)
    return max(1, min(cores, int(cores - others + 0.5)))


def choose_threads(requested: int | None) -> tuple[int, str]:
    """(number of threads, why)."""
    if requested is not None:
        return requested, "the threads option"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = allowed_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores, f"{cores} usable cores (no load average on this system)"
    return free_cores(cores, load), f"{cores} usable cores, load average {load:.2f}"
