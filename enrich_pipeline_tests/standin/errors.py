"""DashScope's error bodies in compatible mode, as the stand-in sends them.

Error bodies, compatible mode: ``{"error": {"message", "type", "param": null, "code"},
"request_id"}`` with the request id also in ``x-request-id``. Codes and messages from
https://help.aliyun.com/en/model-studio/error-code and its Qwen Cloud twin
https://docs.qwencloud.com/api-reference/preparation/error-messages (see ``ERRORS``):
``arrearage`` 400 ``Arrearage``, ``model_access_denied`` 403 ``Model.AccessDenied``,
``unauthorized`` 401 ``invalid_api_key``, ``model_not_found`` 404, ``bad_request`` /
``no_image_support`` / ``image_download_failed`` / ``bad_image`` 400 ``invalid_parameter_error``
(native ``InternalError.Algo.InvalidParameter``), ``moderation`` / ``output_moderation`` 400
``data_inspection_failed`` (native ``DataInspectionFailed``), ``tpm_throttle`` 429.
"""

from __future__ import annotations

from typing import Any

# fault -> (status, code, message) as compatible mode sends them; `type` follows from the code
# (see Reply). Codes and messages: https://help.aliyun.com/en/model-studio/error-code and
# https://docs.qwencloud.com/api-reference/preparation/error-messages, checked against bodies
# users pasted in issues. The native protocol's code is noted where it differs. "{model}" is
# filled with the request's model.
INVALID = "<400> InternalError.Algo.InvalidParameter: "
ERRORS: dict[str, tuple[int, str, str]] = {
    # Native Throttling.RateQuota; the same body answers the per-second (RPS) limit.
    "429": (429, "limit_requests", "Requests rate limit exceeded, please try again later."),
    # Native Throttling.AllocationQuota: TPM or TPS. The pages list the compatible code
    # (insufficient_quota) but show no compatible `type`; it echoes the code, as for
    # limit_requests and Arrearage.
    "tpm_throttle": (
        429,
        "insufficient_quota",
        "Allocated quota exceeded, please increase your quota limit.",
    ),
    "500": (500, "internal_error", "An internal error has occured."),
    "503": (503, "internal_error", "The service is temporarily unavailable."),
    # Native DataInspectionFailed (also InternalError.Algo.DataInspectionFailed in messages);
    # the error page lists the input and the output variants of the message.
    "moderation": (400, "data_inspection_failed", "Input data may contain inappropriate content."),
    "output_moderation": (
        400,
        "data_inspection_failed",
        "Output data may contain inappropriate content.",
    ),
    "bad_image": (
        400,
        "invalid_parameter_error",
        "The image format is illegal and cannot be opened",
    ),
    # "Failed to download multimodal content." Observed compatible body (BerriAI/litellm#6307):
    # code invalid_parameter_error, message prefixed "<400> InternalError.Algo.InvalidParameter: ".
    "image_download_failed": (
        400,
        "invalid_parameter_error",
        INVALID + "Failed to download multimodal content",
    ),
    # The error page: an image_url item sent to a text-only model gives this 400, code
    # InternalError.Algo.InvalidParameter.
    "no_image_support": (
        400,
        "invalid_parameter_error",
        INVALID + "The provided messages input is invalid. The error info is [Unexpected item "
        "type in content]",
    ),
    # A 400 about the request itself, whatever the image: "Range of max_tokens should be
    # [1, xxx]" on the error page, 8192 being qwen-vl-max/plus's output cap.
    "bad_request": (
        400,
        "invalid_parameter_error",
        INVALID + "Range of max_tokens should be [1, 8192]",
    ),
    "unauthorized": (401, "invalid_api_key", "Incorrect API key provided."),
    # The error page's own example: {'code': 'Arrearage', 'param': None, 'message': 'Access
    # denied, please make sure your account is in good standing.', 'type': 'Arrearage'}. The
    # account owes money: every request fails, for every key, until it is paid.
    "arrearage": (
        400,
        "Arrearage",
        "Access denied, please make sure your account is in good standing.",
    ),
    # A sub-workspace key without permission for the model (the page's 403-Model.AccessDenied;
    # message as users report it, langgenius/dify#13769). The compatible code is not shown;
    # the native one is kept, as compatible mode does for Arrearage.
    "model_access_denied": (403, "Model.AccessDenied", "Model access denied."),
    # Native ModelNotFound; the page lists "The model xxx does not exist or you do not have
    # access to it." under 404-ModelNotFound/model_not_found.
    "model_not_found": (
        404,
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
}
# Codes compatible mode files under OpenAI's invalid_request_error type; others echo the code.
_REQUEST_ERROR_CODES = frozenset({"invalid_api_key", "invalid_parameter_error", "model_not_found"})


class Reply(Exception):
    """An error response decided somewhere down the handler."""

    def __init__(
        self,
        fault_or_status: str | int,
        message: str = "",
        fault: str | None = None,
        code: str | None = None,
        model: str = "",
    ) -> None:
        if isinstance(fault_or_status, str):
            self.status, self.code, self.message = ERRORS[fault_or_status]
            self.message = self.message.replace("{model}", model)
        else:  # request validation: DashScope's InvalidParameter unless a code is given
            self.status, self.message = fault_or_status, message
            self.code = code or "invalid_parameter_error"
        self.type = "invalid_request_error" if self.code in _REQUEST_ERROR_CODES else self.code
        self.fault = fault
        self.headers: dict[str, str] = {}
        super().__init__(self.message)


def error_body(reply: Reply, request_id: str) -> dict[str, Any]:
    """The JSON body of an error response, compatible mode's shape."""
    error = {"message": reply.message, "type": reply.type, "param": None}
    return {"error": error | {"code": reply.code}, "request_id": request_id}
