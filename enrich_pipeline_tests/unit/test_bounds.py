"""Every flag and variable has bounds, and a value outside them is one
clear line naming it (never a traceback, never a silent acceptance).

The variables are taken from the settings tree itself, so a setting added later without
bounds fails here. Flags are checked through each command's own parsing, before anything is
opened (``integration/test_bounds_cli.py`` runs the commands for real).
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from enrich_pipeline.cli import batch as batch_cli
from enrich_pipeline.cli import captions
from enrich_pipeline.cli import dagster as enrich_dagster
from enrich_pipeline.cli import search as search_cli
from enrich_pipeline.settings import (
    AutomationSettings,
    BatchSettings,
    ConfigError,
    DashScopeSettings,
    DbSettings,
    ImageSettings,
    RunSettings,
    Settings,
    bounds,
    env_name,
)

MODELS: list[type[BaseModel]] = [
    DbSettings,
    DashScopeSettings,
    RunSettings,
    ImageSettings,
    AutomationSettings,
    BatchSettings,
]
ENUMERATED = {"embedding_dimensions"}  # one of a fixed list
TREE = (DbSettings, DashScopeSettings, RunSettings, ImageSettings)  # the parts of Settings


def numeric_fields() -> list[tuple[type[BaseModel], str]]:
    out = []
    for model in MODELS:
        for name, info in model.model_fields.items():
            kind = str(info.annotation)
            if ("int" in kind or "float" in kind) and name not in ENUMERATED:
                out.append((model, name))
    return out


def env_numeric_fields() -> list[tuple[str, type[BaseModel], str]]:
    return [(env_name(m, n), m, n) for m, n in numeric_fields() if env_name(m, n)]  # type: ignore[misc]


def load(model: type[BaseModel], env: dict[str, str]) -> Any:
    if model is DbSettings:
        env = {"ADBPG_HOST": "db.example.test", **env}
    return model.from_env(env)  # type: ignore[attr-defined]


def one_line_naming(exc: pytest.ExceptionInfo[ConfigError], name: str) -> str:
    message = str(exc.value)
    assert message.startswith(f"{name}: "), message
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize(
    ("model", "name"), numeric_fields(), ids=lambda x: getattr(x, "__name__", x)
)
def test_every_numeric_setting_has_a_lower_and_an_upper_bound(
    model: type[BaseModel], name: str
) -> None:
    found = bounds(model.model_fields[name])
    assert ("ge" in found or "gt" in found) and ("le" in found or "lt" in found), (
        f"{model.__name__}.{name} has bounds {found}: a value outside any bound must be refused"
    )


def _outside(model: type[BaseModel], name: str) -> list[str]:
    found = bounds(model.model_fields[name])
    low = found.get("ge", found.get("gt"))
    high = found.get("le", found.get("lt"))
    values = ["abc", "1e999", "nan", "99999999999999999999999999"]
    if low is not None:
        values.append(str(low - 1) if "ge" in found else str(low))
    if high is not None:
        values.append(str(high + 1) if "le" in found else str(high))
    if "int" in str(model.model_fields[name].annotation):
        values.append("1.5")
    return values


@pytest.mark.parametrize(
    ("var", "model", "name"), env_numeric_fields(), ids=[v for v, _, _ in env_numeric_fields()]
)
def test_every_numeric_variable_out_of_bounds_is_one_line_naming_it(
    var: str, model: type[BaseModel], name: str
) -> None:
    for junk in _outside(model, name):
        with pytest.raises(ConfigError) as info:
            load(model, {var: junk})
        one_line_naming(info, var)
        if model in TREE:  # the whole tree reports it the same way
            with pytest.raises(ConfigError) as info:
                Settings.from_env({var: junk})
            one_line_naming(info, var)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENRICH_SENSOR_INTERVAL", "1.5"),
        ("ENRICH_SENSOR_INTERVAL", "-30"),
        ("ENRICH_SENSOR_INTERVAL", "0"),
        ("ENRICH_BATCH_POLL_INTERVAL", "-1"),
        ("ENRICH_BATCH_POLL_INTERVAL", "10e9"),
        ("ENRICH_LEASE_SECONDS", "0"),
        ("ENRICH_LEASE_SECONDS", "-120"),
        ("ENRICH_LEASE_SECONDS", str(2**63)),
        ("ENRICH_IMAGE_MAX_BYTES", str(10**30)),
        ("ENRICH_IMAGE_MAX_PIXELS", str(10**30)),
        ("DASHSCOPE_TIMEOUT", "inf"),
        ("DASHSCOPE_BACKOFF_INITIAL", "nan"),
    ],
)
def test_fractions_negatives_zeros_huge_and_non_finite_values_are_refused(
    variable: str, value: str
) -> None:
    model = next(m for var, m, _ in env_numeric_fields() if var == variable)
    with pytest.raises(ConfigError) as info:
        load(model, {variable: value})
    one_line_naming(info, variable)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("ADBPG_URL", "not a dsn", "not a valid libpq connection string"),
        ("ADBPG_URL", "postgresql://u@db.example.test:abc/x", "port"),
        ("ADBPG_URL", "postgresql://u@db.example.test:99999/x", "port"),
        ("DASHSCOPE_BASE_URL", "dashscope.aliyuncs.com/compatible-mode/v1", "http"),
        ("DASHSCOPE_BASE_URL", "ftp://gw.example.test/v1", "http"),
        ("DASHSCOPE_BASE_URL", "http://gw.example.test:notaport/v1", "valid URL"),
        ("DASHSCOPE_BASE_URL", "http://" + "x" * 3000, "at most"),
        ("DASHSCOPE_VISION_MODEL", "q" * 300, "at most"),
        ("ENRICH_PROMPT_VERSION", "v" * 300, "at most"),
        ("ENRICH_PRICES", "{", "JSON"),
        ("ENRICH_PRICES", "[1, 2]", "JSON object"),
        ("ENRICH_PRICES", '{"qwen3-vl-plus": [-1, 2]}', "two numbers"),
        ("ENRICH_PRICES", '{"qwen3-vl-plus": [1]}', "two numbers"),
        ("ENRICH_PRICES", '{"qwen3-vl-plus": ["a", "b"]}', "two numbers"),
        ("ENRICH_ALLOWED_NETWORKS", "10.0.0.0/8, intranet", ""),
        ("ENRICH_OFFLINE", "maybe", ""),
    ],
)
def test_text_variables_are_checked_too(variable: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    message = one_line_naming(info, variable)
    assert says in message, message


def test_a_secret_or_a_credentialed_url_is_never_echoed_in_the_error() -> None:
    cases = {
        "ADBPG_URL": "host=db.example.test password=hunter2-secret extra words",
        "DASHSCOPE_API_KEY": "sk-secret-0123\nsecond-line",
        "DASHSCOPE_BASE_URL": "gopher://gw:hunter2-secret@gw.example.test/v1?api-key=k3y-secret",
    }
    for variable, value in cases.items():
        with pytest.raises(ConfigError) as info:
            Settings.from_env({variable: value})
        message = one_line_naming(info, variable)
        for secret in ("hunter2", "sk-secret", "second-line", "k3y-secret"):
            assert secret not in message, message


def test_several_junk_variables_are_named_in_one_line() -> None:
    env = {
        "DASHSCOPE_RPM": "lots",
        "ENRICH_LEASE_SECONDS": "0",
        "ENRICH_IMAGE_TIMEOUT": "-1",
        "ADBPG_URL": "postgresql://u@h:abc/db",
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert "\n" not in message
    for variable in env:
        assert f"{variable}: " in message, message
    with pytest.raises(ConfigError) as info:
        AutomationSettings.from_env(
            {"ENRICH_SENSOR_INTERVAL": "1.5", "ENRICH_BATCH_POLL_INTERVAL": "-60"}
        )
    assert "ENRICH_SENSOR_INTERVAL: " in str(info.value)
    assert "ENRICH_BATCH_POLL_INTERVAL: " in str(info.value)


def test_a_bare_percent_in_the_database_url_is_read_literally() -> None:
    settings = DbSettings.from_env({"ADBPG_URL": "postgresql://enrich:p%ss%@db.example.test/x"})
    assert settings.conninfo.get_secret_value() == "postgresql://enrich:p%25ss%25@db.example.test/x"
    assert settings.redacted() == "enrich@db.example.test:5432/x"
    assert "p%ss%" in settings.secrets()
    # A real escape stays an escape.
    escaped = DbSettings.from_env({"ADBPG_URL": "postgresql://enrich:p%40ss@db.example.test/x"})
    assert escaped.conninfo.get_secret_value() == "postgresql://enrich:p%40ss@db.example.test/x"


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-1", "5432.5", " "])
def test_adbpg_port_is_checked_before_connecting(port: str) -> None:
    env = {"ADBPG_HOST": "db.example.test", "ADBPG_PORT": port}
    if not port.strip():
        assert DbSettings.from_env(env).redacted().endswith(":5432/postgres")
        return
    with pytest.raises(ConfigError) as info:
        DbSettings.from_env(env)
    one_line_naming(info, "ADBPG_PORT")


# ---------------------------------------------------------------------------------------------
# Flags: each command's own parsing, before anything is opened


def captions_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        captions.settings_from(captions.parse_args(argv))
    return str(info.value)


@pytest.mark.parametrize(
    ("flag", "values"),
    [
        ("--lease-seconds", ["0", "-5", str(10**20)]),
        ("--max-items", ["-1", str(10**20)]),
        ("--batch-size", ["0", "-1", str(10**20)]),
        ("--concurrent", ["0", "-1", str(10**20)]),
        ("--max-attempts", ["0", "-1", str(10**20)]),
    ],
)
def test_enrich_captions_flags_are_bounded(flag: str, values: list[str]) -> None:
    for value in values:
        message = captions_error(["--user-id", "u", flag, value])
        assert message.startswith(f"{flag}: ") and "\n" not in message, message


def batch_submit_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        batch_cli.submit_settings(batch_cli.parse_args(["submit", "--user-id", "u", *argv]))
    return str(info.value)


@pytest.mark.parametrize(
    ("flag", "values"),
    [
        ("--max-items", ["-1", str(10**20)]),
        ("--max-lines", ["0", "-1", str(10**20)]),
        ("--max-bytes", ["0", "-1", str(10**20)]),
        ("--concurrent", ["0", str(10**20)]),
        ("--max-attempts", ["0", str(10**20)]),
    ],
)
def test_enrich_batch_submit_flags_are_bounded(flag: str, values: list[str]) -> None:
    for value in values:
        message = batch_submit_error([flag, value])
        assert message.startswith(f"{flag}: ") and "\n" not in message, message


def test_enrich_batch_max_items_zero_means_every_row() -> None:
    batch, _ = batch_cli.submit_settings(
        batch_cli.parse_args(["submit", "--user-id", "u", "--max-items", "0"])
    )
    assert batch.max_items is None


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--user-id", "u", "q", "--top-k", "-1"], "--top-k: "),
        (["--user-id", "u", "q", "--top-k", "0"], "--top-k: "),
        (["--user-id", "u", "q", "--top-k", str(10**20)], "--top-k: "),
        (["--user-id", "u", "x" * 5000], "characters"),
        (["--user-id", "u", "   "], "the search text is empty"),
        ([], "needs one of: the text, --like ID, --like-image"),
        (["q", "--like", "1"], "needs one of: the text, --like ID, --like-image"),
        (["--like", "  "], "--like: "),
        (["q", "--lang", ""], "--lang: "),
        (["q", "--user-id", "u" * 500], "--user-id: "),
        (["--user-id", "u", "q", "--color", ""], "--color: "),
        (["--user-id", "u", "q", "--tag", "t" * 500], "--tag: "),
        (["--user-id", "u", "q", *["--tag", "t"] * 21], "--tag: "),
    ],
)
def test_enrich_search_flags_are_bounded(argv: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        search_cli.check_args(search_cli.parse_args(argv))
    assert says in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--port", "0"], "--port: "),
        (["--port", "65536"], "--port: "),
        (["ui", "--port", "-1"], "--port: "),
        (["--host", ""], "--host: "),
        (["--host", "a host"], "--host: "),
        (["backfill", "--users", ""], "--users: "),
        (["backfill", "--users", " , "], "--users: "),
    ],
)
def test_enrich_dagster_flags_are_bounded(argv: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        enrich_dagster.check_args(enrich_dagster.parse_args(argv))
    assert str(info.value).startswith(says)


def test_enrich_dagster_backfill_users_are_kept_as_given() -> None:
    args = enrich_dagster.parse_args(["backfill", "--users", "alice,bob,alice"])
    assert enrich_dagster.check_args(args) == ["alice", "bob"]
    assert (
        enrich_dagster.check_args(enrich_dagster.parse_args(["backfill", "--all-pending"])) is None
    )
