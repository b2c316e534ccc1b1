"""Which Model Studio region a base URL points at: prices, Batch API models and the rate budget
differ by region (and API keys too: "新加坡和北京地域的API Key不同").

Hosts, from https://alibabacloud.com/help/en/model-studio/compatibility-of-openai-with-dashscope
(Feb 2026) and https://www.alibabacloud.com/help/doc-detail/2833609.html (Mar 2026):
``dashscope.aliyuncs.com`` (China, Beijing), ``dashscope-intl.aliyuncs.com`` (Singapore),
``dashscope-us.aliyuncs.com`` (US, Virginia), ``cn-hongkong.dashscope.aliyuncs.com`` (Hong Kong),
and the workspace domains ``{WorkspaceId}.<region-id>.maas.aliyuncs.com`` that newer pages
recommend (https://www.alibabacloud.com/help/id/model-studio/qwen-vl-compatible-with-openai).
Any other host (a local vLLM, the stand-in, a proxy) has no known region.
"""

from __future__ import annotations

from urllib.parse import urlsplit

BEIJING = "beijing"
SINGAPORE = "singapore"
US = "us"
HONG_KONG = "hongkong"
TOKYO = "tokyo"
FRANKFURT = "frankfurt"

_HOSTS = {
    "dashscope.aliyuncs.com": BEIJING,
    "dashscope-intl.aliyuncs.com": SINGAPORE,
    "dashscope-us.aliyuncs.com": US,
    "cn-hongkong.dashscope.aliyuncs.com": HONG_KONG,
}
_REGION_IDS = {
    "cn-beijing": BEIJING,
    "ap-southeast-1": SINGAPORE,
    "us-east-1": US,
    "cn-hongkong": HONG_KONG,
    "ap-northeast-1": TOKYO,
    "eu-central-1": FRANKFURT,
}


def host_of(base_url: str) -> str:
    """The base URL's host (and port), lower case, without credentials."""
    try:
        parts = urlsplit(base_url.strip())
        host = (parts.hostname or "").lower()
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return ""


def region_of(base_url: str) -> str | None:
    """The Model Studio region of ``base_url``, or None for any other server."""
    host = host_of(base_url).split(":")[0]
    if host in _HOSTS:
        return _HOSTS[host]
    labels = host.split(".")
    if len(labels) == 5 and labels[2:] == ["maas", "aliyuncs", "com"]:
        return _REGION_IDS.get(labels[1])
    return None
