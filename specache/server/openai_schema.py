"""Request and response bodies of the OpenAI API subset specache serves (pydantic v2).

Request models ignore unknown fields (``user``, ``metadata``, ``logit_bias``...): OpenAI clients
send them routinely, and refusing them would break drop-in use. Fields specache adds on top of
the OpenAI API: ``cache``, ``cache_tags``, ``speculative``, ``priority``, ``top_k``.
Ranges follow the OpenAI reference so a request that OpenAI rejects is rejected here too (400).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Finite floats only: JSON from Python clients may carry NaN / Infinity literals.
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1, le=1 << 31)]
Seed = Annotated[int, Field(ge=-(1 << 63), lt=1 << 63)]
StopStr = Annotated[str, Field(min_length=1)]
Stop = StopStr | Annotated[list[StopStr], Field(max_length=4)] | None
CacheMode = Literal["use", "bypass", "refresh"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions. Defaults are OpenAI's."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the served model name (GET /v1/models)")
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=-1, le=1 << 20)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    # Bounded away from 0: logits / 5e-324 overflow to inf and the sampler cannot draw from NaN.
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0, allow_inf_nan=False)] = 1.0
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # specache extensions
    cache: CacheMode = Field(
        "use", description="response cache: use | bypass | refresh (regenerate, overwrite)"
    )
    cache_tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=16)] = Field(
        default_factory=list
    )
    speculative: dict[str, Any] | str | None = Field(
        None,
        description="per-request speculative decoding override; accepted, currently a no-op "
        "(the engine picks the method at start and adapts K per step)",
    )
    priority: Annotated[int, Field(ge=-1000, le=1000)] = Field(0, description="lower = scheduled sooner")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)

    def as_template_dict(self) -> dict[str, Any]:
        """{"role", "content": str} (+ "name"): the shape chat templates and cache keys expect."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


PromptIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | PromptIds
        | Annotated[list[PromptIds], Field(min_length=1, max_length=64)]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specache"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# Declared on every route so the OpenAPI document (and the fuzzer reading it) knows the error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "invalid request"),
        (401, "bad or missing API key"),
        (404, "unknown model"),
        (429, "too many requests in flight"),
        (503, "shutting down / overloaded"),
        (504, "request timed out"),
    ]
}
