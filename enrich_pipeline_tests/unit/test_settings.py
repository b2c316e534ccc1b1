"""The settings tree: defaults declared once, every bad value one line naming its source."""

from __future__ import annotations

import pytest

from enrich_pipeline.cli import captions
from enrich_pipeline.db.quota import RateBudgetTable
from enrich_pipeline.providers.dashscope import openai_client
from enrich_pipeline.redaction import scrub_secrets
from enrich_pipeline.settings import (
    AutomationSettings,
    BatchSettings,
    ConfigError,
    DashScopeSettings,
    DbSettings,
    ImageSettings,
    RunSettings,
    Settings,
)


def test_legacy_defaults_are_the_run_defaults() -> None:
    run = RunSettings()
    assert (run.batch_size, run.max_items, run.concurrent) == (10, 100, 5)
    assert run.caption_embedding and run.max_attempts == 3


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DASHSCOPE_RPM", "1.5"),
        ("DASHSCOPE_RPM", "-1"),
        ("DASHSCOPE_TIMEOUT", "-1"),
        ("DASHSCOPE_EMBEDDING_DIMENSIONS", "100"),
        ("ENRICH_MAX_IMAGE_SIDE", "0"),
        ("ENRICH_MAX_ATTEMPTS", "zero"),
        ("ENRICH_LEASE_SECONDS", "0"),
        ("ENRICH_OFFLINE", "maybe"),
        ("ENRICH_IMAGE_TIMEOUT", "0"),
        ("ENRICH_ALLOWED_NETWORKS", "intranet"),
        ("ADBPG_NAMESPACE", "x" * 64),
    ],
)
def test_a_junk_variable_is_one_line_naming_it(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    message = str(info.value)
    assert message.startswith(f"{variable}: ") and "\n" not in message


def test_port_is_checked_before_connecting() -> None:
    with pytest.raises(ConfigError, match="^ADBPG_PORT: "):
        DbSettings.from_env({"ADBPG_HOST": "db.example.test", "ADBPG_PORT": "abc"})


def test_adbpg_dsn_is_read_where_adbpg_url_is_not_set() -> None:
    dsn, url = "postgresql://u@dsn.example.test/x", "postgresql://u@url.example.test/x"
    assert DbSettings.from_env({"ADBPG_DSN": dsn}).redacted() == "u@dsn.example.test:5432/x"
    assert DbSettings.from_env({"ADBPG_DSN": dsn, "ADBPG_URL": url}).redacted().startswith("u@url.")
    with pytest.raises(ConfigError, match="^ADBPG_DSN: "):
        DbSettings.from_env({"ADBPG_DSN": "postgresql://u@h:abc/x"})


def test_only_the_named_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # A field without a variable is not read from one that shares its name, and a model built
    # in code holds what it was given, whatever the environment says.
    assert RunSettings.from_env({"batch_size": "7", "BATCH_SIZE": "7"}).batch_size == 10
    monkeypatch.setenv("ENRICH_MAX_ATTEMPTS", "9")
    assert RunSettings().max_attempts == 3
    assert RunSettings.from_env().max_attempts == 9
    assert RunSettings.from_env({"ENRICH_MAX_ATTEMPTS": "  "}).max_attempts == 3


@pytest.mark.parametrize("variable", ["ENRICH_SENSOR_INTERVAL", "ENRICH_MAX_CONCURRENT_RUNS"])
def test_automation_settings_are_bounded(variable: str) -> None:
    for junk in ("1.5", "-30", "0"):
        with pytest.raises(ConfigError, match=f"^{variable}: "):
            AutomationSettings.from_env({variable: junk})


def test_secrets_stay_out_of_repr_and_errors() -> None:
    settings = Settings.from_env(
        {"DASHSCOPE_API_KEY": "sk-secret-123", "ADBPG_URL": "postgresql://u:pw-42@h/db"}
    )
    assert "sk-secret-123" not in repr(settings) and "pw-42" not in repr(settings)
    with pytest.raises(ConfigError) as info:
        DashScopeSettings.build({"api_key": 42})
    assert "42" not in str(info.value)


def test_no_dump_repr_or_str_of_any_settings_model_shows_a_secret() -> None:
    key, password = "sk-dump-key-0417", "pw-dump-0417"
    env = {
        "DASHSCOPE_API_KEY": key,
        "ADBPG_URL": f"postgresql://enrich:{password}@db.example.test/items",
    }
    tree = Settings.from_env(env)
    models = [
        tree,
        tree.db,
        tree.dashscope,
        DbSettings.from_env({"ADBPG_HOST": "db.example.test", "ADBPG_PASSWORD": password}),
        DbSettings(conninfo=f"host=db.example.test password={password}"),
        DashScopeSettings(api_key=key),
        RunSettings.from_env(env),
        ImageSettings.from_env(env),
        AutomationSettings.from_env(env),
        BatchSettings.from_env(env),
    ]
    for model in models:
        shown = [
            str(model.model_dump()),
            model.model_dump_json(),
            repr(model),
            str(model),
            str(model.model_dump(mode="json")),
        ]
        for text in shown:
            assert key not in text and password not in text, text
    # The driver and the client still get the real values.
    assert tree.dashscope.api_key.get_secret_value() == key
    assert password in tree.db.conninfo.get_secret_value()


def test_reading_settings_hides_nothing_using_them_does() -> None:
    """Validation has no side effects: the key and the password are hidden in library logs
    (and in scrubbed text) from the moment a client or a connection is made with them."""
    key, password = "sk-unused-key-5150", "pw-unused-5150"
    api = DashScopeSettings.from_env({"DASHSCOPE_API_KEY": key})
    db = DbSettings.from_env({"ADBPG_URL": f"postgresql://u:{password}@db.example.test/x"})
    assert scrub_secrets(f"{key} {password}") == f"{key} {password}"
    openai_client(api).close()
    RateBudgetTable(db)
    assert scrub_secrets(f"{key} {password}") == "*** ***"


def test_flags_take_defaults_and_bounds_from_the_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = captions.settings_from(captions.parse_args([]))
    assert settings.run == RunSettings()
    with pytest.raises(ConfigError, match="^--batch-size: "):
        captions.settings_from(captions.parse_args(["--batch-size", "0"]))
    with pytest.raises(ConfigError, match="^--lease-seconds: "):
        captions.settings_from(captions.parse_args(["--lease-seconds", "0"]))
    with pytest.raises(ConfigError, match="^--max-items: "):
        captions.settings_from(captions.parse_args(["--max-items", str(10**12)]))
    assert captions.settings_from(captions.parse_args(["--max-items", "0"])).run.max_items is None
    with pytest.raises(SystemExit):
        captions.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "default 10" in shown and "ENRICH_MAX_ATTEMPTS" in shown


def test_an_environment_value_is_the_flags_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICH_MAX_ATTEMPTS", "5")
    assert captions.settings_from(captions.parse_args([])).run.max_attempts == 5
    run = captions.settings_from(captions.parse_args(["--max-attempts", "2"])).run
    assert run.max_attempts == 2
