"""GenerationProgress: one progress bar over a call's output tokens, fed per step with token counts.

The bar's total is the output tokens the requests may still produce (max_tokens, clamped to the room
max_model_len leaves); a request that stops early (EOS, a stop string) takes its unused tokens off the
total, so the bar ends with count == total == the output tokens produced. The rate tqdm shows is then
output tokens per second, and the postfix says how many requests are done and how many prompt tokens
are prefilled, so a long prefill never reads as a stalled bar or "0 tok/s".

Shown on stderr when asked for (`use_tqdm`: True, or as in vLLM a tqdm-like class to build the bar with,
e.g. `functools.partial(tqdm, delay=2)` to show it only for runs longer than 2 s) and while the project
logger shows INFO (NANOVLLM_LOG_LEVEL=WARNING keeps it quiet).
"""
import logging
from collections.abc import Callable

from tqdm.auto import tqdm

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)


class GenerationProgress:
    def __init__(self, planned_output_tokens: int, num_requests: int, num_prompt_tokens: int,
                 use_tqdm: bool | Callable = True, desc: str = "Generating"):
        self.num_requests, self.num_prompt_tokens = num_requests, num_prompt_tokens
        self.total, self.count = planned_output_tokens, 0  # output tokens: planned (shrinking), produced
        self.num_finished = self.num_prefilled = 0
        make_bar = use_tqdm if callable(use_tqdm) else tqdm
        visible = bool(use_tqdm) and logger.isEnabledFor(logging.INFO)
        # whether step-by-step counts are wanted: for a visible bar, and for a caller's own bar class (it may
        # act on every update); otherwise counting each request's end is enough (and streams nothing per step)
        self.per_step = visible or callable(use_tqdm)
        self.bar = make_bar(total=planned_output_tokens, desc=desc, unit="tok", dynamic_ncols=True,
                            disable=not visible)
        self._show_postfix()

    def advance(self, output_tokens: int = 0, prompt_tokens: int = 0, finished_unused: list[int] = ()) -> None:
        """One step's new output tokens and newly computed prompt tokens (negative when a preempted request
        must recompute its prompt); `finished_unused` has, per request that finished in the step, how many of
        its planned output tokens it did not produce."""
        if finished_unused:
            self.total -= sum(finished_unused)
            self.bar.total = self.total
        self.count += output_tokens
        self.num_finished += len(finished_unused)
        self.num_prefilled += prompt_tokens
        if finished_unused or prompt_tokens:
            self._show_postfix()
        self.bar.update(output_tokens)

    def _show_postfix(self) -> None:
        prefill = (f", prompts {self.num_prefilled}/{self.num_prompt_tokens} tokens in"
                   if self.num_prefilled < self.num_prompt_tokens else "")
        self.bar.set_postfix_str(f"{self.num_finished}/{self.num_requests} requests done{prefill}", refresh=False)

    def close(self) -> None:
        self.bar.close()
