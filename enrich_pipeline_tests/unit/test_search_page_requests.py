"""The search page's requests as a search, and its thumbnails: what a browser may ask for.

The page's JSON becomes the same ``SearchQuery`` the command line makes, every field within its
bounds; a thumbnail is made by the run's guarded loader, so an address the SSRF guard refuses is
a refusal with its code, and a picture is a small JPEG.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from enrich_pipeline.cli.search_page import PAGE_MAX_TOP_K, ThumbnailCache, parse_query
from enrich_pipeline.enrichment.images import ImageLoadError, ImagePolicy
from enrich_pipeline.enrichment.images.thumbnail import THUMBNAIL_SIDE, thumbnail_jpeg
from enrich_pipeline.pipeline.search import SearchQuery
from enrich_pipeline.settings import ConfigError
from enrich_pipeline_tests.helpers import data_url, encode


def test_the_pages_json_is_the_commands_query() -> None:
    query = parse_query(
        {
            "text": "  red chair ",
            "colors": ["red", " "],
            "tags": ["chair"],
            "languages": ["zh"],
            "users": ["alice", "bob"],
            "mode": "both",
            "top_k": 20,
        }
    )
    assert query == SearchQuery(
        text="red chair",
        users=("alice", "bob"),
        mode="both",
        colors=("red",),
        tags=("chair",),
        languages=("zh",),
        top_k=20,
    )
    # "More like this" searches by the item alone, whatever the text box still holds.
    liked = parse_query({"text": "red chair", "like_id": "42", "mode": None})
    assert (liked.text, liked.like_id, liked.mode) == (None, "42", None)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"text": "   "}, "type what to look for"),
        ([], "JSON object"),
        ({"text": 5}, "text: a string"),
        ({"text": "x" * 2001}, "more than 2000"),
        ({"text": "chair", "mode": "pixels"}, "mode: one of caption, image, both"),
        ({"text": "chair", "top_k": PAGE_MAX_TOP_K + 1}, "top_k"),
        ({"text": "chair", "top_k": True}, "top_k"),
        ({"text": "chair", "colors": "red"}, None),
        ({"text": "chair", "colors": [1]}, "colors: a list of strings"),
        ({"text": "chair", "tags": ["t"] * 21}, "at most 20"),
        ({"text": "chair", "users": ["u" * 101]}, "at most 100 characters"),
        ({"like_id": ["1"]}, "like_id"),
        # A picture by URL or path is the command line's: a web request never names a file.
        ({"like_image": "/etc/passwd"}, "type what to look for"),
    ],
)
def test_a_request_out_of_bounds_is_one_line_naming_the_field(
    body: object, said: str | None
) -> None:
    if said is None:  # one string where a list is expected is taken as that one value
        assert parse_query(body).colors == ("red",)
        return
    with pytest.raises(ConfigError, match=said):
        parse_query(body)


def test_a_thumbnail_is_a_small_jpeg_of_the_picture() -> None:
    picture = Image.new("RGB", (1600, 800), (200, 40, 40))
    jpeg = thumbnail_jpeg(data_url(encode(picture, "PNG")), ImagePolicy())
    shown = Image.open(io.BytesIO(jpeg))
    assert shown.format == "JPEG"
    assert shown.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 2)
    r, g, b = shown.convert("RGB").getpixel((10, 10))
    assert r > 150 and g < 90 and b < 90


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/", "blocked_address"),
        ("http://127.0.0.1:9/secret.png", "blocked_address"),
        ("http://[::ffff:10.0.0.1]/x.png", "blocked_address"),
        ("/etc/hostname", "bad_source"),
        (data_url(b"<html>not a picture</html>", "image/png"), "not_an_image"),
    ],
)
def test_a_thumbnail_the_guard_refuses_is_its_code(source: str, code: str) -> None:
    # The page's policy in a deployment: no private networks, no local files.
    with pytest.raises(ImageLoadError) as refused:
        thumbnail_jpeg(source, ImagePolicy(allow_local_files=False, timeout=5.0))
    assert refused.value.code == code


def test_the_thumbnail_cache_keeps_the_latest() -> None:
    cache = ThumbnailCache(size=2)
    for n in range(3):
        cache.put(("alice", str(n), "digest"), bytes([n]))
    assert cache.get(("alice", "0", "digest")) is None
    assert cache.get(("alice", "2", "digest")) == b"\x02"
