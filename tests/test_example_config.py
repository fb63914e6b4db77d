"""examples/config.yaml loads as shipped, prices the seed's request at exactly 3.5e-06, and
its commented-out sections are valid and say the truth once uncommented."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path

import pytest

from fake_openai import DEFAULT_USAGE
from server.config import ConfigError, ModelPrice, Settings, load_settings
from server.pricing import price_nanos

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "config.yaml"
ENV = {"LITELLM_MASTER_KEY": "sk-1234"}


def test_the_example_config_loads_with_its_prices_and_litellm_settings() -> None:
    settings = load_settings(EXAMPLE, ENV)
    assert settings.master_key == "sk-1234"  # general_settings.master_key: os.environ/...
    assert settings.success_callback == ("prometheus",)
    assert settings.prices["llama3"] == ModelPrice(Decimal("1e-7"), Decimal("2e-7"))
    assert settings.prices["gpt-4o-mini"] == ModelPrice(Decimal("1.5e-7"), Decimal("6e-7"))
    # The fake upstream's default usage at the llama3 price is the seed's "Current cost".
    prompt, completion = DEFAULT_USAGE["prompt_tokens"], DEFAULT_USAGE["completion_tokens"]
    assert price_nanos(settings.prices, "llama3", prompt, completion) == 3500  # 3.5e-06 USD


def test_the_master_key_comes_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="LITELLM_MASTER_KEY is not set"):
        load_settings(EXAMPLE, {})
    # BUDGETD_MASTER_KEY wins over the file, as documented in it.
    both = {**ENV, "BUDGETD_MASTER_KEY": "sk-other"}
    assert load_settings(EXAMPLE, both).master_key == "sk-other"


def uncomment(text: str, header: str) -> str:
    """``text`` with the commented-out block that starts at the line ``header`` (``# key:``
    at some indentation) turned back into YAML: every following line at that indentation
    that starts with ``# `` loses it, up to the first line that does not."""
    lines = text.splitlines()
    start = lines.index(header)
    indent = header[: len(header) - len(header.lstrip())]
    end = start
    while end < len(lines) and lines[end].startswith(indent + "# "):
        lines[end] = indent + lines[end][len(indent) + 2 :]
        end += 1
    return "\n".join(lines) + "\n"


def test_the_commented_budgetd_section_shows_the_defaults(tmp_path: Path) -> None:
    shipped = load_settings(EXAMPLE, ENV)
    text = uncomment(EXAMPLE.read_text(), "# budgetd:")
    assert "\nbudgetd:\n  grpc_addr: 127.0.0.1:50051" in text
    uncommented = tmp_path / "config.yaml"
    uncommented.write_text(text)
    settings = load_settings(uncommented, ENV)
    # Each key it lists is set to what budgetd uses without it.
    assert dataclasses.replace(settings, config_path=shipped.config_path) == shipped
    defaults = Settings()
    assert (settings.grpc_addr, settings.bridge_listen) == (
        defaults.grpc_addr,
        defaults.bridge_listen,
    )


def test_the_commented_default_team_settings_are_valid(tmp_path: Path) -> None:
    uncommented = tmp_path / "config.yaml"
    uncommented.write_text(uncomment(EXAMPLE.read_text(), "  # default_team_settings:"))
    (team,) = load_settings(uncommented, ENV).default_team_settings
    assert (team.team_id, team.max_budget, team.budget_duration) == (
        "default-settings",
        100.0,
        "30d",
    )
