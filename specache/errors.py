"""Named errors users can cause. Each message says what is wrong and what to do.

The server maps them to OpenAI-style error JSON via ``status_code``.
"""


class SpecacheError(Exception):
    """Base of every error a user can cause."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidPromptError(SpecacheError):
    """The prompt is empty or not text / token ids."""


class PromptTooLongError(SpecacheError):
    """The prompt (plus max_tokens) does not fit max_model_len or the KV budget."""

    status_code = 400


class InvalidSamplingParamsError(SpecacheError):
    """A sampling parameter is out of range."""


class ModelNotFoundError(SpecacheError):
    """The model path does not exist or the model name is unknown."""

    status_code = 404
    error_type = "model_not_found"


class ModelFormatError(SpecacheError):
    """The file is not a GGUF / safetensors model we can read (or it is truncated)."""


class UnsupportedModelError(SpecacheError):
    """The architecture is not one specache implements."""


class ConfigError(SpecacheError):
    """An engine option is out of range."""
