"""The engine: requests in, tokens out, one scheduler step at a time."""

from __future__ import annotations

import itertools
import logging
import time
import uuid

import torch

from specache.config import EngineConfig
from specache.engine.outputs import CompletionOutput, RequestOutput
from specache.engine.runner import BatchItem, ModelRunner
from specache.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from specache.engine.sequence import Sequence
from specache.engine.stopping import find_stop_string, held_back, token_stop_reason
from specache.errors import ConfigError, InvalidPromptError, PromptTooLongError
from specache.kv.block_pool import BlockPool
from specache.kv.cache import KVCache
from specache.kv.sizing import num_blocks_for_budget
from specache.models.llama import LlamaModel
from specache.models.loader import LoadedModel
from specache.sampling import SamplingParams, TokenRandom, sample_for_sequences

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.loaded = loaded
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.device = config.torch_device
        self.model = LlamaModel(mc, loaded.weights, config.torch_dtype, self.device, config.weight_format)
        self.max_model_len = min(config.max_model_len or min(mc.max_position_embeddings, 8192),
                                 mc.max_position_embeddings)
        num_blocks = num_blocks_for_budget(mc, config.kv_cache_bytes, config.block_size, config.torch_kv_dtype)
        if num_blocks < 1:
            raise ConfigError(f"kv_cache_memory={config.kv_cache_memory} holds no KV block of this model; raise it")
        self.pool = BlockPool(num_blocks, config.block_size)
        self.cache = KVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim,
                             config.torch_kv_dtype, self.device)
        self.prefix_cache = None
        self.host_tier = None  # CPU tier (L2) of the prefix cache, only with the radix tree (L1)
        if config.enable_prefix_caching:
            from specache.prefix.radix import RadixCache

            if config.prefix_cpu_cache_bytes:
                from specache.prefix.host_tier import HostKVTier

                self.host_tier = HostKVTier(self.cache, config.prefix_cpu_cache_bytes)
            self.prefix_cache = RadixCache(self.pool, config.block_size,
                                           on_evict=self.host_tier.store if self.host_tier is not None else None)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.pool, self.prefix_cache, self.host_tier)
        self.runner = ModelRunner(self.model, self.cache)
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(mc.eos_token_ids)
        self.requests: dict[str, list[Sequence]] = {}
        self.live_seqs: dict[int, Sequence] = {}  # by seq_id, for proposers that need block tables
        self._seq_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        self.spec = None
        if config.speculative:
            from specache.spec.decoder import SpecDecoder

            self.spec = SpecDecoder(self, config.speculative, config.num_spec_tokens)
        self.stats = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self._restore_prefix_cache()

    def _restore_prefix_cache(self) -> None:
        from specache.prefix import persist

        if self.prefix_cache is None:
            return
        if self.config.prefix_cache_dir:
            persist.load_prefix_cache(self, self.config.prefix_cache_dir)
        if self.config.warmup_prompts:
            persist.warmup(self, persist.read_warmup_file(self.config.warmup_prompts))

    def shutdown(self) -> None:
        """Abort what is running and persist the prefix cache (if configured)."""
        for rid in list(self.requests):
            self.abort(rid)
        if self.prefix_cache is not None and self.config.prefix_cache_dir:
            from specache.prefix.persist import save_prefix_cache

            save_prefix_cache(self, self.config.prefix_cache_dir)

    def prefix_stats(self) -> dict:
        """Prefix-cache counters by tier: device (radix tree, L1) and host (CPU tier, L2).

        Hit rates are per query token, so device + host = the share of prompt tokens not prefilled."""
        if self.prefix_cache is None:
            return {}
        tree = self.prefix_cache.stats()
        host = self.host_tier.stats() if self.host_tier is not None else {}
        q = tree["query_tokens"]
        host_hits = host.get("hit_tokens", 0)
        s = {"queries": tree["queries"], "query_tokens": q, "device_hit_tokens": tree["hit_tokens"],
             "host_hit_tokens": host_hits, "hit_tokens": tree["hit_tokens"] + host_hits,
             "device_hit_rate": tree["hit_tokens"] / q if q else 0.0, "host_hit_rate": host_hits / q if q else 0.0,
             "device_cached_blocks": tree["cached_blocks"], "device_evicted_blocks": tree["evictions"]}
        s["hit_rate"] = s["hit_tokens"] / q if q else 0.0
        s.update({f"host_{k}": v for k, v in host.items() if k != "hit_tokens"})
        return s

    # ------------------------------------------------------------------ requests

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidPromptError("the prompt is empty; send at least one character")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidPromptError(f"token ids {bad[:5]} are outside the vocabulary [0, "
                                         f"{self.model_config.vocab_size})")
        else:
            raise InvalidPromptError("a prompt is a string or a list of token ids")
        if not ids:
            raise InvalidPromptError("the prompt is empty after tokenization; send some text")
        return ids

    def check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt} tokens but max_model_len is {self.max_model_len}; "
                "shorten the prompt or raise --max-model-len")
        spec_slots = self.config.num_spec_tokens if self.spec is not None else 0
        worst = min(num_prompt + params.max_tokens, self.max_model_len) + spec_slots
        if self.pool.blocks_needed(worst) > self.pool.num_blocks:
            raise PromptTooLongError(
                f"prompt + max_tokens needs {worst} tokens of KV cache but the whole budget holds "
                f"{self.pool.num_blocks * self.pool.block_size}; lower max_tokens or raise --kv-cache-memory")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, cache_salt=None) -> str:
        params = params or SamplingParams()
        params.validate()
        ids = self.tokenize_prompt(prompt)
        self.check_fits(len(ids), params)
        request_id = request_id or uuid.uuid4().hex
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(next(self._seq_ids), request_id, i, ids, params, priority, cache_salt)
            seq.random = TokenRandom(seed) if seed is not None or self._rng is None else \
                TokenRandom(int(torch.randint(0, 2**62, (1,), generator=self._rng)))
            seqs.append(seq)
            self.live_seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now (client went away): its KV blocks go back to the pool at once."""
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One engine step; an output for every request it advanced (finished_only: for those that
        finished, so a caller that waits for whole results skips re-detokenizing every step)."""
        if self.spec:
            self.spec.plan(self.scheduler.running, self.scheduler.waiting)
        sched = self.scheduler.schedule(self.spec.slots_for if self.spec else None)
        if not sched.scheduled:
            return []
        self.stats["steps"] += 1
        items, drafts = self._build_items(sched)
        logits = self.runner.run(items)
        touched: dict[str, None] = {}
        sampled = self._sample(items, logits, drafts)
        for it, new_tokens in zip(items, sampled, strict=True):
            seq = it.seq
            seq.num_computed = it.start + len(it.token_ids)
            if new_tokens is not None:  # drafts past the accepted ones hold no valid K/V
                seq.num_computed -= it.num_draft - (len(new_tokens) - 1)
            if new_tokens is not None:
                self._accept_tokens(seq, new_tokens, it.num_draft)
                touched[seq.request_id] = None
            if not seq.is_finished:
                self.scheduler.trim_blocks(seq, seq.num_computed)
                if it.num_logits and not seq.output_ids[:-1] and self.prefix_cache is not None:
                    self.scheduler.cache_prefix(seq)  # prompt done: share it with later requests now
        if finished_only:
            touched = {rid: None for rid in touched if all(q.is_finished for q in self.requests[rid])}
        return [self._request_output(rid) for rid in touched]

    def _build_items(self, sched: SchedulerOutput) -> tuple[list[BatchItem], list[list[int] | None]]:
        items, drafts = [], []
        draft_by_seq = self.spec.propose(sched) if self.spec else {}
        for s in sched.scheduled:
            seq, start = s.seq, s.seq.num_computed
            tokens = seq.tokens[start: start + s.num_new_tokens]
            ends_prompt = start + s.num_new_tokens == seq.num_tokens
            draft = draft_by_seq.get(seq.seq_id)
            if draft:
                tokens = tokens + draft
            items.append(BatchItem(seq, tokens, start, (1 + len(draft or [])) if ends_prompt else 0,
                                   len(draft or [])))
            drafts.append(draft)
        return items, drafts

    def _sample(self, items: list[BatchItem], logits: list[torch.Tensor | None],
                drafts: list[list[int] | None]) -> list[list[int] | None]:
        rows = [(it, lg) for it, lg in zip(items, logits, strict=True) if lg is not None]
        out: list[list[int] | None] = [None] * len(items)
        if not rows:
            return out
        if self.spec is not None:
            return self.spec.verify(items, logits, drafts)
        tokens = sample_for_sequences(torch.cat([lg for _, lg in rows]), [it.seq for it, _ in rows])
        k = 0
        for i, lg in enumerate(logits):
            if lg is not None:
                out[i] = [tokens[k]]
                k += 1
        return out

    def _accept_tokens(self, seq: Sequence, tokens: list[int], num_draft: int = 0) -> None:
        """Append a step's tokens (a verified draft's accepted prefix and one target token) up to
        the first stop."""
        seq.num_steps += 1
        for i, tok in enumerate(tokens):
            seq.append(tok)
            self.stats["generation_tokens"] += 1
            reason = token_stop_reason(seq, tok, self.eos_ids, self.max_model_len)
            if reason is None and seq.params.stop:
                reason = self._check_stop_strings(seq)
            if reason is not None:
                # Tokens after the stop are dropped; so is their unverified KV.
                seq.num_computed = min(seq.num_computed, seq.num_tokens - 1)
                _uncount_drafts_past(seq, kept=i + 1, num_accepted=len(tokens) - 1, num_draft=num_draft)
                self._finish(seq, reason)
                return

    def _check_stop_strings(self, seq: Sequence) -> str | None:
        before = len(seq.text)
        seq.text = self.tokenizer.decode(seq.output_ids)
        cut = find_stop_string(seq.text, seq.params.stop, before)
        if cut is None:
            return None
        seq.text = seq.text[:cut]
        return "stop"

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.params.stop and reason != "stop":
            seq.text = self.tokenizer.decode(seq.output_ids)
        seq.finish_time = time.monotonic()
        self.scheduler.finish(seq, reason)
        self.live_seqs.pop(seq.seq_id, None)
        if self.spec:
            self.spec.release(seq)

    # ------------------------------------------------------------------ outputs

    def _visible_text(self, seq: Sequence) -> str:
        if seq.params.stop:
            text = seq.text if seq.is_finished else self.tokenizer.decode(seq.output_ids)
            return text if seq.is_finished else text[: len(text) - held_back(text, seq.params.stop)]
        text = self.tokenizer.decode(seq.output_ids)
        # An incomplete multi-byte character is not streamed until the next token completes it.
        return text.rstrip("\ufffd") if not seq.is_finished else text

    def _request_output(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        outs = []
        for seq in seqs:
            text = self._visible_text(seq)
            sent_text, sent_ids = getattr(seq, "_sent", ("", 0))
            delta = text[len(sent_text):] if text.startswith(sent_text) else ""
            outs.append(CompletionOutput(seq.index, text, list(seq.output_ids), seq.finish_reason, delta,
                                         list(seq.output_ids[sent_ids:])))
            seq._sent = (text if text.startswith(sent_text) else sent_text, len(seq.output_ids))
        finished = all(s.is_finished for s in seqs)
        out = RequestOutput(request_id, seqs[0].prompt_ids, outs, finished, self._metrics(seqs))
        if finished:
            self.requests.pop(request_id, None)
        return out

    def _metrics(self, seqs: list[Sequence]) -> dict:
        s = seqs[0]
        drafted = sum(q.spec_drafted for q in seqs)
        accepted = sum(q.spec_accepted for q in seqs)
        steps = sum(q.spec_steps for q in seqs)
        return {
            "prompt_tokens": s.num_prompt,
            "completion_tokens": sum(len(q.output_ids) for q in seqs),
            "cached_tokens": s.num_cached_prefix,  # device (radix tree) + host (CPU tier)
            "host_cached_tokens": s.num_host_cached,
            "ttft_s": (s.first_token_time - s.arrival) if s.first_token_time else None,
            "latency_s": (s.finish_time - s.arrival) if s.finish_time else None,
            "num_preemptions": sum(q.num_preemptions for q in seqs),
            "spec_draft_tokens": drafted,
            "spec_accepted_tokens": accepted,
            "spec_draft_steps": steps,  # decode steps that verified a draft
            "target_passes": sum(q.num_steps for q in seqs),  # steps that emitted tokens, drafted or not
            "spec_acceptance_rate": accepted / drafted if drafted else None,
            "spec_mean_accepted_length": (accepted + steps) / steps if steps else None,
        }


def _uncount_drafts_past(seq: Sequence, kept: int, num_accepted: int, num_draft: int) -> None:
    """A stop cut the step's tokens after `kept`: the request's metrics describe its output, so the
    draft positions past the cut count neither as drafted nor as accepted (every accepted draft
    counted is a token of the output). The controller's record keeps them: the verifier did accept
    them, which is what its acceptance rate predicts."""
    if num_draft:
        seq.spec_drafted -= max(0, num_draft - kept)
        seq.spec_accepted -= max(0, num_accepted - kept)
