"""The settings tree: defaults declared once, every bad value one line naming its source."""

from __future__ import annotations

import pytest

from enrich_pipeline.cli import captions
from enrich_pipeline.settings import (
    AutomationSettings,
    ConfigError,
    DashScopeSettings,
    DbSettings,
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
