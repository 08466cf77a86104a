"""The OpenAI request bodies the server takes (pydantic: unknown fields ignored as OpenAI does, wrong types refused)
and the error shape it answers with, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

# strict: "16" is not a number here (OpenAI refuses it too); an int is still a valid float
_REQUEST = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool = False


class Sampling(BaseModel):
    """The sampling fields completions and chat share (OpenAI's, plus vLLM's top_k and min_p)."""

    model_config = _REQUEST
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's -1 (off) is taken as 0
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's: generate exactly max_tokens (benchmarks)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = _REQUEST
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; it wins
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model_config = _REQUEST
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = _REQUEST
    model: str | None = None
    tokens: list[int]


class APIError(Exception):
    """An answer in OpenAI's error shape with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_exceeded", 503: "service_unavailable", 500: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
