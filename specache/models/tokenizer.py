"""Tokenizer + chat template: a `tokenizers` tokenizer and a Jinja template from the model files."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from specache.errors import InvalidPromptError


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None, eos_token_ids: list[int],
                 bos_token: str = "", eos_token: str = "") -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, model_dir: Path, eos_token_ids: list[int]) -> Tokenizer:
        model_dir = Path(model_dir)
        tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = cfg.get("chat_template")
        jinja_path = model_dir / "chat_template.jinja"
        if template is None and jinja_path.exists():
            template = jinja_path.read_text()
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        if not eos_token_ids and eos:
            eos_token_ids = [tok.token_to_id(eos)]
        return cls(tok, template, list(eos_token_ids), bos, eos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            # Base models have no template: a plain transcript is the honest fallback.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidPromptError("each chat message needs a 'role' and a 'content'")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)


def _token_str(tok: object) -> str:
    if isinstance(tok, dict):
        return tok.get("content", "")
    return tok or ""


def _raise_template_error(msg: str) -> None:
    raise jinja2.TemplateError(msg)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas for streaming.

    Decoding the tail window (not just the new token) keeps multi-byte characters and
    tokens whose text depends on their neighbours right; an incomplete UTF-8 sequence
    (U+FFFD at the end) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""

    def update(self, all_ids: list[int]) -> str:
        text = self.tokenizer.decode(all_ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text if text.startswith(self.text) else self.text
        return delta
