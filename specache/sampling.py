"""Sampling: parameters, logits -> probabilities, and seeded draws.

``logits_to_probs`` is the single place where temperature, top-k, top-p, min-p and the
penalties are applied. Plain decoding and speculative verification both call it, which is
what makes speculative sampling lossless: p and q are processed exactly alike.

Draws are inverse-CDF draws (``draw_rows``) with uniforms from a sequence's ``TokenRandom``,
keyed by the position of the token they decide rather than drawn in order (see TokenRandom).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from specache import kernels
from specache.errors import InvalidSamplingParamsError

# Temperatures below this are greedy (as in vLLM): dividing logits by ~1e-300 overflows to inf/NaN.
MIN_TEMPERATURE = 1e-5
# Beyond these bounds the penalty overflows logits and helps nobody.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidSamplingParamsError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature < float("inf"):  # written so that NaN fails too
            bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            bad(f"repetition_penalty must be in [{low}, {high}] (1 = off), got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            bad("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be a positive integer, got {self.n!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be between 0 and 20, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )

    @property
    def raw_argmax(self) -> bool:
        """Greedy without penalties: the token is the raw logits' argmax (no distribution needed)."""
        return self.greedy and not self.has_penalties


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """Repetition penalty (HF style, over prompt + output) and OpenAI presence/frequency
    penalties (over output only). ``logits`` is one row [V], modified in place."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        if len(seen):
            vals = logits[seen]
            rp = params.repetition_penalty
            logits[seen] = torch.where(vals > 0, vals / rp, vals * rp)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output_ids, dtype=torch.long, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


# Top-k / top-p / min-p look for a row's kept tokens among its best this-many first (torch.topk), and
# go on to more, up to sorting the whole vocabulary, only for rows whose set reaches past them. A
# full sort of a 49k vocabulary cost ~4 ms a row (40 ms for a 17-row verification with top_p), topk
# of 256 ~0.1 ms.
FILTER_CANDIDATES = (256, 4096)


def _top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       min_p: torch.Tensor) -> torch.Tensor:
    """Mask logits [N, V] outside each row's top-k / nucleus / min-p set with -inf (rows with none
    of the three as they are)."""
    rows, vocab = logits.shape
    filtered = (top_k > 0) | (top_p < 1) | (min_p > 0)
    if not bool(filtered.any()):
        return logits
    out = torch.full_like(logits, float("-inf"))
    if not bool(filtered.all()):
        out[~filtered] = logits[~filtered]
    pending = torch.nonzero(filtered).flatten()
    for count in (*FILTER_CANDIDATES, vocab):
        every = pending.numel() == rows  # all rows: no gather of whole rows
        kept, tokens, decided = _filter_among_best(logits if every else logits[pending], top_k[pending],
                                                   top_p[pending], min_p[pending], min(count, vocab))
        if every and bool(decided.all()):
            return out.scatter_(1, tokens, kept)
        done = pending[decided]
        out[done] = torch.full((done.numel(), vocab), float("-inf"), dtype=logits.dtype,
                               device=logits.device).scatter_(1, tokens[decided], kept[decided])
        pending = pending[~decided]
        if not pending.numel():
            break
    return out


def _filter_among_best(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                       count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The filters applied to each row's `count` best tokens: their logits (-inf where removed), their
    token ids, and whether the row's whole set is decided there (every token past them removed: by
    top-k, by the nucleus, which the candidates' mass already fills, or by min-p, which the last
    candidate already falls below). Probabilities are the row's after top-k (as plain decoding's)."""
    vocab = logits.shape[-1]
    values, tokens = logits.topk(count, dim=-1)  # descending
    ranks = torch.arange(count, device=logits.device)
    k_on = top_k > 0
    remove = ranks >= torch.where(k_on, top_k, vocab).unsqueeze(1)
    # normalised over the top-k set (inside the candidates whenever the row is decided), else the row
    norm = values.masked_fill(remove, float("-inf")).logsumexp(dim=-1)
    if not bool(k_on.all()):
        norm = torch.where(k_on, norm, logits.logsumexp(dim=-1))
    probs = (values - norm.unsqueeze(1)).exp().masked_fill(remove, 0.0)
    mass = probs.cumsum(dim=-1)
    # Nucleus: drop a token when the mass strictly before it already reaches top_p. Rows with
    # top_p = 1 skip it: float32 cumsum reaches 1.0 before the tail and would drop rare tokens.
    remove |= ((mass - probs) >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    remove |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    remove[:, 0] = False  # always keep the most likely token
    if count == vocab:
        decided = torch.ones_like(k_on)
    else:
        # A top-k row is decided only once its set is inside: until then its probabilities are
        # normalised over the candidates, not over its top-k set, and its nucleus would be too small.
        cut_past = ((top_p < 1) & (mass[:, -1] >= top_p)) | ((min_p > 0) & (probs[:, -1] < min_p * probs[:, 0]))
        decided = torch.where(k_on, top_k <= count, cut_past)
    return values.masked_fill(remove, float("-inf")), tokens, decided


def logits_to_probs(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
) -> torch.Tensor:
    """Turn raw logits [N, V] into the distribution each row samples from.

    Greedy rows (temperature 0) become one-hot on the argmax, so verification can treat
    greedy and sampled requests alike.
    """
    logits = logits.float()
    if any(p.has_penalties for p in params):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.has_penalties:
                apply_penalties(logits[i], p, prompt_ids[i] if prompt_ids else [],
                                output_ids[i] if output_ids else [])
    if all(p.greedy for p in params):  # one-hot rows only: skip the softmax they would discard
        return _one_hot_argmax(logits)
    device = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    logits = logits / temps.unsqueeze(1)
    if any((p.top_k > 0 or p.top_p < 1 or p.min_p > 0) and not p.greedy for p in params):
        # greedy rows are left unfiltered: their one-hot argmax replaces whatever is computed here
        top_k = torch.tensor([0 if p.greedy else max(p.top_k, 0) for p in params], device=device)
        top_p = torch.tensor([1.0 if p.greedy else p.top_p for p in params], device=device)
        min_p = torch.tensor([0.0 if p.greedy else p.min_p for p in params], device=device)
        logits = _top_k_top_p_min_p(logits, top_k, top_p, min_p)
    probs = logits.softmax(dim=-1)
    if greedy.any():
        probs = torch.where(greedy.unsqueeze(1), _one_hot_argmax(logits), probs)
    return probs


def argmax_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first on ties, as torch.argmax). The native kernel on fp32 CPU rows:
    torch.argmax took 0.75 ms for 16 x 49k logits, ~3% of a 16-sequence decode step."""
    native = kernels.load() if rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.dim() == 2 \
        and rows.shape[1] > 0 else None
    return native.argmax_rows(rows) if native is not None else rows.argmax(dim=-1)


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] rows of 0 with a 1 at each row's argmax (a greedy row's distribution)."""
    return torch.zeros_like(logits).scatter_(1, argmax_rows(logits).unsqueeze(1), 1.0)


_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
_USE_GAMMA = 0xD1B54A32D192ED03  # spreads the use ids apart before mixing


def _mix64(z: int) -> int:
    """splitmix64's output function: a bijective 64-bit mix (Steele, Lea and Flood 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class TokenRandom:
    """One sequence's random numbers, keyed by where they are used instead of drawn in order.

    The uniform for the token at position i (prompt + output index) and one use (the draw itself, a
    model's draft, an acceptance test, a residual draw) is splitmix64's i-th output from a stream
    key mixed from the seed and the use. Plain decoding draws the token at position i with
    uniform(i, DRAW), and speculative verification draws every target token it emits with that
    same uniform: so a seeded request under prompt lookup or lookahead (drafts without a q) gives
    plain decoding's text token for token, whatever K the controller chose at each step. Nothing
    depends on the batch, or on how many numbers an earlier step happened to use (an ordered
    generator's draws, under an adaptive K, depended on its step times).
    """

    DRAW, DRAFT, ACCEPT, RESIDUAL = 1, 2, 3, 4

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(62) if seed is None else int(seed)
        key = _mix64((self.seed + _GOLDEN_GAMMA) & _MASK64)
        self._streams = {use: _mix64(key ^ (use * _USE_GAMMA & _MASK64))
                         for use in (self.DRAW, self.DRAFT, self.ACCEPT, self.RESIDUAL)}

    def uniform(self, position: int, use: int) -> float:
        """A uniform in [0, 1) for the token at `position`, for one use (DRAW, DRAFT, ...)."""
        z = _mix64((self._streams[use] + (position + 1) * _GOLDEN_GAMMA) & _MASK64)
        return (z >> 11) * (1.0 / (1 << 53))

    def uniforms(self, first: int, count: int, use: int) -> list[float]:
        return [self.uniform(first + j, use) for j in range(count)]


# Rows are summed in blocks of this many tokens: a draw finds its block from the block sums and its
# token from one block's cumulative sum. A float64 cumsum over a 49k vocabulary cost ~0.15 ms a row
# and torch.multinomial ~1 ms; the block sums are one vectorised pass.
DRAW_BLOCK = 1024


def draw_rows(weights: torch.Tensor, u: torch.Tensor | list[float]) -> list[int]:
    """Inverse-CDF draw per row of non-negative weights [R, V] (unnormalised), one uniform each.

    The same weights and uniform always give the same token, whoever asks: plain decoding, and
    verification checking whether plain decoding would have drawn a draft token. Sums are float64,
    so no token's share is distorted by rounding; a token of zero weight is never drawn.
    """
    rows, vocab = weights.shape
    u = torch.as_tensor(u, dtype=torch.float64, device=weights.device).reshape(rows)
    nb = -(-vocab // DRAW_BLOCK)
    padded = weights if nb * DRAW_BLOCK == vocab else torch.nn.functional.pad(weights, (0, nb * DRAW_BLOCK - vocab))
    blocks = padded.reshape(rows, nb, DRAW_BLOCK)
    ends = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # [R, nb]: mass up to each block's end
    total = ends[:, -1]
    if not bool(torch.isfinite(total).all()) or bool((total <= 0).any()):
        raise ValueError("sampling: a distribution has no probability mass (NaN/inf logits?)")
    target = u * total
    block = torch.searchsorted(ends, target.unsqueeze(1), right=True).squeeze(1).clamp_(max=nb - 1)
    before = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                         torch.zeros_like(target))
    inside = blocks[torch.arange(rows, device=weights.device), block].cumsum(dim=-1, dtype=torch.float64)
    offset = torch.searchsorted(inside, (target - before).unsqueeze(1), right=True).squeeze(1)
    tokens = (block * DRAW_BLOCK + offset).tolist()
    for r in torch.nonzero(offset >= DRAW_BLOCK).flatten().tolist():
        # The target fell past the chosen block's own cumulative sum (it rounds differently from
        # the block sums): the block's last token with weight; for u * total rounded up to the
        # total, past a last block without weight, the row's last token with weight.
        b = int(block[r])
        in_block = torch.nonzero(blocks[r, b] > 0).flatten()
        tokens[r] = b * DRAW_BLOCK + int(in_block[-1]) if in_block.numel() else \
            int(torch.nonzero(weights[r] > 0).flatten()[-1])
    return tokens


def sample(probs: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> list[int]:
    """One token per row. Greedy rows take the argmax; the others draw with their row's uniform."""
    out = argmax_rows(probs).tolist()
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = probs if len(sampled) == len(params) else probs[sampled]
        for i, tok in zip(sampled, draw_rows(rows, [uniforms[i] for i in sampled]), strict=True):
            out[i] = tok
    return out


def sample_for_sequences(logits: torch.Tensor, seqs: list) -> list[int]:
    """One token per row for the sequences the rows belong to (their params, histories, and the
    uniform of each one's next position)."""
    uniforms = [0.0 if s.params.greedy else s.random.uniform(s.num_tokens, TokenRandom.DRAW) for s in seqs]
    return sample_logits(logits, [s.params for s in seqs], [s.prompt_ids for s in seqs],
                         [s.output_ids for s in seqs], uniforms)


def sample_logits(logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                  output_ids: list[list[int]], uniforms: list[float]) -> list[int]:
    """One token per row of raw logits. An all-greedy batch without penalties (the common decode
    case) takes the argmax directly: softmax + one-hot over a 49k vocabulary cost ~1 ms a step."""
    if all(p.raw_argmax for p in params):
        return argmax_rows(logits).tolist()
    return sample(logits_to_probs(logits, params, prompt_ids, output_ids), params, uniforms)
