"""One generation stream: its tokens, its KV block table and its progress. Tensor-free."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from specache.sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n choices
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (vLLM convention)
    cache_salt: Any = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_prefix: int = 0  # prompt tokens served by the prefix cache at admission
    num_host_cached: int = 0  # of which copied back from the prefix cache's CPU tier
    status: Status = Status.WAITING
    finish_reason: str | None = None
    prefix_node: Any = None  # radix node locked while this sequence runs
    text: str = ""
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0
    spec_steps: int = 0
    num_steps: int = 0  # target passes (prefill's last chunk, decode and verification steps) that emitted tokens
    random: Any = None  # its TokenRandom: the uniforms its sampled tokens are drawn with

    def __post_init__(self) -> None:
        self.tokens: list[int] = list(self.prompt_ids) + list(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_prefill(self) -> bool:
        """Still computing prompt tokens (after a preemption this includes earlier output)."""
        return self.num_computed < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        self.tokens.append(token)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def slot(self, position: int, block_size: int) -> int:
        return self.block_table[position // block_size] * block_size + position % block_size
