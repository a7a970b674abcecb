"""Errors as the OpenAI API shapes them, `{"error": {"message", "type", "param", "code"}}`, for every endpoint.

fluxion's InputError names the argument first ("num_inference_steps (--steps): expected ..."); `input_error`
rewrites that name as the API parameter a client sent, so a 400 always points at the field to fix."""

import re

from ..errors import InputError


class APIError(Exception):
    """An error answered to the client as is: status, message, type, param, code, headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# fluxion's argument names -> the names API clients use (per API: OpenAI says "size", BFL "width"/"height")
OPENAI_PARAMS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
                 "guidance_scale": "guidance", "true_cfg_scale": "true_cfg", "seed": "seed", "height": "size",
                 "width": "size", "image": "image", "mask_image": "mask", "strength": "strength",
                 "num_images_per_prompt": "n", "scale": "lora", "sizes": "size"}
BFL_PARAMS = {**OPENAI_PARAMS, "height": "height", "width": "width", "sizes": "width"}

_LEADING_NAME = re.compile(r"^(?P<name>[a-z_]+)(?P<index>\[[^\]]*\])?(?: \([^)]*\))?: ")


def input_error(error: InputError, params: dict[str, str] = OPENAI_PARAMS, default: str | None = None) -> APIError:
    """A 400 naming the API parameter behind a fluxion InputError."""
    message = " ".join(str(error).split())
    match = _LEADING_NAME.match(message)
    if match and match["name"] in params:
        param = params[match["name"]]
        message = f"{param}: {message[match.end():]}"
    elif message.startswith("width x height"):  # Pipeline.check_size
        param = params.get("sizes", default)
    elif message.startswith("one ") and " image needs about " in message:  # the memory estimate refused the size
        param = params.get("sizes", default)
    else:
        param = default
    return bad_request(message, param)


def unauthorized(message: str = "missing or invalid API key (send 'Authorization: Bearer KEY' or 'x-key: KEY')"):
    return APIError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def rate_limited(message: str, retry_after: float, code: str = "rate_limit_exceeded") -> APIError:
    return APIError(429, message, type="rate_limit_error", code=code,
                    headers={"Retry-After": str(max(1, round(retry_after + 0.499)))})


def unavailable(message: str, retry_after: float = 1.0, code: str = "model_loading") -> APIError:
    return APIError(503, message, type="server_error", code=code,
                    headers={"Retry-After": str(max(1, round(retry_after + 0.499)))})
