"""The OpenAI API surface of server.py: the error shape, the request schemas, and the log-prob objects of
responses.

Errors: every failure answers `{"error": {"message", "type", "param", "code"}}` in OpenAI's vocabulary (see
the errors section); FastAPI's 422 for a bad body becomes 400 naming the field (as OpenAI, vLLM and SGLang
do). Requests: strict types (a wrong type is a 400), unknown fields accepted and ignored (as vLLM does).
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------------------------- errors
# OpenAI's vocabulary: `type` is invalid_request_error for every 4xx input error (404 unknown model included),
# "requests" for a 429 (OpenAI's requests-per-minute limit; code rate_limit_exceeded) and server_error for a
# 5xx; `param` names the request field in OpenAI's path syntax (`messages[0].role`) or is null; `code` is
# OpenAI's machine-readable reason (model_not_found, missing_required_parameter, invalid_type, invalid_value,
# empty_array, integer_above_max_value, context_length_exceeded, rate_limit_exceeded, ...) or null.
def _default_type(status: int) -> str:
    return "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """An error answered to the client: HTTP status, message, the offending request field (param) in OpenAI's
    path syntax, OpenAI's error code; the type follows from the status unless given."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _default_type(status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def range_error(param: str, value, lo, hi) -> APIError:
    """OpenAI's out-of-range error: integer_/decimal_ below_min_value / above_max_value (invalid_value for NaN)."""
    kind = "integer" if isinstance(value, int) else "decimal"
    if value < lo:
        code, bound = f"{kind}_below_min_value", f">= {lo}"
    elif value > hi:
        code, bound = f"{kind}_above_max_value", f"<= {hi}"
    else:  # NaN compares false both ways
        code, bound = "invalid_value", f"between {lo} and {hi}"
    return APIError(400, f"Invalid '{param}': {value} is out of range: it must be between {lo} and {hi} "
                         f"(expected a value {bound}).", param, code)


def param_path(parts) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role' (OpenAI's param syntax)."""
    out = ""
    for x in parts:
        out += f"[{x}]" if isinstance(x, int) else f".{x}" if out else str(x)
    return out or None


_JSON_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
               dict: "an object", type(None): "null"}


def _json_type(v) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def _walk(loc, body, err_type) -> tuple[list, int | None]:
    """Resolve a pydantic error location against the request body: the field path, and where a union member
    tag (pydantic's `str`, `list[ContentPart]`, ... naming an alternative) interrupts it, or None."""
    parts, obj = [], body
    for i, x in enumerate(loc):
        if isinstance(x, int) and isinstance(obj, list):
            parts.append(x)
            obj = obj[x] if 0 <= x < len(obj) else None
        elif isinstance(x, str) and isinstance(obj, dict) and (x in obj or (i == len(loc) - 1 and err_type == "missing")):
            parts.append(x)
            obj = obj.get(x)
        else:
            return parts, i
    return parts, None


def validation_error(errs: list[dict], body, content_type: str = "application/json") -> APIError:
    """FastAPI's 422 (pydantic's errors) as OpenAI's 400: the first error's field as param, OpenAI's code.
    content_type: the request's header; FastAPI reads no JSON from a body sent as anything else."""
    first = errs[0] if errs else {"type": "value_error", "loc": ("body",), "msg": "invalid request"}
    kind, msg = first.get("type", ""), first.get("msg", "invalid request")
    loc = list(first.get("loc", ()))
    loc = loc[1:] if loc[:1] == ["body"] else loc
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", msg)
        return APIError(400, f"We could not parse the JSON body of your request: it is not valid JSON ({detail}). "
                             "Send a JSON object with Content-Type: application/json.")
    if not loc:  # the body as a whole
        if isinstance(first.get("input"), bytes) and "json" not in content_type.lower():
            return APIError(400, f"The request body was sent as Content-Type: {content_type or '(none)'}, which "
                                 "this server does not read: send Content-Type: application/json with a JSON object.",
                            code="invalid_type")
        if kind == "missing":
            return APIError(400, "The request has no body: send a JSON object with Content-Type: application/json.")
        return APIError(400, f"The request body must be a JSON object, got {_json_type(first.get('input'))}.",
                        code="invalid_type")
    parts, tag = _walk(loc, body, kind)
    param = param_path(parts)
    if tag is not None and parts:  # a union field: every alternative failed
        site = loc[:tag]
        alts = [e for e in errs if list(e.get("loc", ()))[1:][:tag] == site and len(e.get("loc", ())) - 1 > tag]
        tags = list(dict.fromkeys(str(list(e["loc"])[1:][tag]) for e in alts))
        if all(len(e["loc"]) - 1 == tag + 1 and e["type"].endswith("_type") for e in alts):
            return APIError(400, f"Invalid type for '{param}': expected one of {', '.join(tags)}, got "
                                 f"{_json_type(first.get('input'))}.", param, "invalid_type")
        deep = max(alts, key=lambda e: len(e["loc"]))
        dloc = list(deep["loc"])[1:]
        dpath = param_path(_walk(dloc[:tag] + dloc[tag + 1:], body, deep["type"])[0])
        return APIError(400, f"Invalid value for '{param}': it matches none of {', '.join(tags)} (as "
                             f"{dloc[tag]}: '{dpath}': {deep['msg']}).", param, "invalid_value")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "too_short" and first.get("input") == []:
        n = first.get("ctx", {}).get("min_length", 1)
        return APIError(400, f"Invalid '{param}': empty array. Expected an array with minimum length {n}, but got "
                             "an empty array instead.", param, "empty_array")
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        return APIError(400, f"Invalid value for '{param}': {first.get('input')!r}. Supported values are: {expected}.",
                        param, "invalid_value")
    if kind.endswith("_type"):
        return APIError(400, f"Invalid type for '{param}': {msg[:1].lower() + msg[1:]}, but got "
                             f"{_json_type(first.get('input'))} instead.", param, "invalid_type")
    return APIError(400, f"Invalid value for '{param}': {msg}.", param, "invalid_value")


async def _validation_handler(request: Request, exc: RequestValidationError):
    """FastAPI answers bad bodies with 422; OpenAI (and vLLM, SGLang) say 400 and name the field."""
    return error_response(validation_error(exc.errors(), exc.body, request.headers.get("content-type", "")))


async def _api_error_handler(request: Request, exc: APIError):
    return error_response(exc)


async def _http_handler(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:  # OpenAI's answer to an unknown route
        return error_response(APIError(404, f"Invalid URL ({request.method} {request.url.path})"))
    if exc.status_code == 405:
        return error_response(APIError(405, f"Method not allowed: {request.method} {request.url.path}"))
    return error_response(APIError(exc.status_code, str(exc.detail)))


async def _server_error_handler(request: Request, exc: Exception):
    """Anything unexpected: 500 in the same shape (the traceback still goes to the server's log)."""
    return error_response(APIError(500, f"The server had an error while processing your request: "
                                        f"{type(exc).__name__}: {exc}"))


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app raises or FastAPI produces answers in OpenAI's error shape."""
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(Exception, _server_error_handler)


# ---------------------------------------------------------------------------------------------- request schemas
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # wrong types → 400; unknown fields ignored (vLLM)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # developer = system and tool = observation in GLM's template
    role: Literal["system", "developer", "user", "assistant", "tool", "observation"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extra
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extra
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


# ---------------------------------------------------------------------------------------------- response log-probs
def token_str(tok, i: int) -> str:
    return tok.decode([i])


def chat_logprob(tok, t, top, n_top):
    """One entry of a chat choice's `logprobs.content`: token t, its log-prob and the n_top best of `top`."""
    best = sorted(top.items(), key=lambda kv: -kv[1])[:n_top]
    s = token_str(tok, t)
    return {"token": s, "logprob": top[t], "bytes": list(s.encode()),
            "top_logprobs": [{"token": token_str(tok, i), "logprob": v, "bytes": list(token_str(tok, i).encode())}
                             for i, v in best]}


def completion_logprobs(tok, items, n_top):
    """The legacy completions `logprobs` object for (token, top log-probs) items; top None (an echoed prompt's
    first token) gives null entries."""
    tokens, lps, tops, offs, pos = [], [], [], [], 0
    for t, top in items:
        s = token_str(tok, t)
        tokens.append(s)
        lps.append(None if top is None else top[t])
        tops.append(None if top is None else
                    {token_str(tok, i): v for i, v in sorted(top.items(), key=lambda kv: -kv[1])[:n_top]})
        offs.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def to_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
