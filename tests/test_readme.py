"""The README's seed walkthrough runs as written, against a real budgetd, with real grpcurl.

Every ``sh`` block of the walkthrough is run by bash; only the address and the ids that a
reader copies from one answer into the next command are substituted. Each ``json`` block
that follows a command must have the same fields as the real answer, and the same values
for everything that does not change from run to run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from harness import make_settings, running_server
from server.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## The seed walkthrough, with grpcurl"
# Values that differ on every run (ids, keys, instants); everything else must match.
VOLATILE = {
    "team_id",
    "key",
    "key_id",
    "reservation_id",
    "budget_reset_at",
    "created_at",
    "retry_after",
}


def walkthrough_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block in the README's walkthrough section."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def run_block(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{script}\n{done.stderr}"
    return done.stdout


async def test_readme_seed_walkthrough_works_word_for_word(tmp_path: Path) -> None:
    blocks = walkthrough_blocks()
    assert sum(lang == "sh" for lang, _ in blocks) >= 5
    async with running_server("embedded", make_settings(tmp_path)) as running:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        substitutions: dict[str, str] = {"localhost:50051": running.target}
        answers: list[dict[str, object]] = []
        # Variables a reader set in earlier blocks are still set in their terminal.
        prelude: list[str] = []
        for index, (lang, body) in enumerate(blocks):
            if lang != "sh":
                continue
            script = body
            for old, new in substitutions.items():
                script = script.replace(old, new)
            out = await asyncio.to_thread(run_block, "\n".join([*prelude, script]), env)
            prelude += [ln for ln in script.splitlines() if re.match(r"(export )?[A-Z_]+=", ln)]
            following = blocks[index + 1] if index + 1 < len(blocks) else ("", "")
            if following[0] != "json":
                continue
            real = json.loads(out)
            documented = json.loads(following[1])
            assert set(real) == set(documented), (script, real)
            for field, value in documented.items():
                if field not in VOLATILE:
                    assert real[field] == value, (field, real[field], value)
            # What a reader copies from this answer into the next commands.
            for field in ("team_id", "key"):
                if field in real:
                    substitutions[str(documented[field])] = str(real[field])
            if "reservation_id" in real:
                env["RID"] = str(real["reservation_id"])
            answers.append(real)
    denial = answers[-1]
    assert denial["message"] == (
        "Budget has been exceeded! Current cost: 3.5e-06, Max budget: 1e-09"
    )


def test_readme_configuration_example_loads(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration") :]
    example = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)[0]
    path = tmp_path / "config.yaml"
    path.write_text(example)
    env = {
        "LITELLM_MASTER_KEY": "sk-readme",
        "DATABASE_URL": "postgresql://budgetd@db.internal/budgetd",
        "REDIS_URL": "redis://redis.internal:6379/0",
    }
    settings = load_settings(path, env)
    assert settings.master_key == "sk-readme"
    assert settings.redis_url == "redis://redis.internal:6379/0"
    assert "llama3" in settings.prices
    assert settings.default_team_settings[0].max_budget == 100.0
