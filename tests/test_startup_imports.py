"""What a start loads: optional dependencies stay out of ``sys.modules`` until they are used.

Imports are most of budgetd's cold start (issue 7), so heavy modules are imported where they
are used: PyJWT and cryptography (and the aiohttp session of JWKS fetches) only when JWT
authentication is on, asyncpg and redis-py only for the stores that use them, aiohttp for
the metrics endpoint only when it starts, the HTTP bridge only for ``budgetd up``/``bridge``,
and matplotlib (the bench's plots) never. Timing would be flaky; these tests check what is
in ``sys.modules`` instead, each in a fresh interpreter (this one has imported everything).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WATCHED = (
    "aiohttp",
    "asyncpg",
    "clients.bridge",
    # Not the bare "cryptography" package: redis-py imports it (cheaply) to see whether it is
    # installed. Its key handling, which PyJWT and server.jwt_auth load, is what costs.
    "cryptography.hazmat.primitives.asymmetric",
    "cryptography.x509",
    "jwt",
    "matplotlib",
    "redis",
    "server.jwt_auth",
    "server.storage.postgres",
    "server.storage.redis_counters",
    "server.storage.sqlite",
)
"""Modules each scenario reports on (whether they were imported)."""

# Runs in a fresh interpreter: argv[1] is the scenario, argv[2] a scratch directory. Prints
# the watched modules that ended up in sys.modules, as JSON.
CHILD = """
import asyncio, json, sys
from pathlib import Path

scenario, scratch = sys.argv[1], Path(sys.argv[2])
watched = json.loads(sys.argv[3])

import server.cli  # what `budgetd` imports before it parses its arguments

if scenario != "import":
    from server.app import BudgetdServer
    from server.config import load_settings

    env = {"BUDGETD_DATA_DIR": str(scratch / "data"), "BUDGETD_METRICS": "false"}
    config = None
    if scenario == "services":
        # Stores are built, not started: nothing connects to these.
        env["DATABASE_URL"] = "postgresql://budgetd@127.0.0.1:1/budgetd"
        env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    if scenario == "jwt":
        config = scratch / "jwt.yaml"
        config.write_text(
            "general_settings:\\n  enable_jwt_auth: true\\n"
            "budgetd:\\n  jwt_hmac_secret: " + "s" * 32 + "\\n"
        )
    settings = load_settings(config, env, {"grpc_addr": "127.0.0.1:0"})
    server = BudgetdServer(settings)

    async def serve_once() -> None:
        await server.start()
        await server.stop(grace=0)

    if scenario != "services":
        asyncio.run(serve_once())

print(json.dumps(sorted(name for name in watched if name in sys.modules)))
"""


def loaded(scenario: str, tmp_path: Path) -> set[str]:
    """The watched modules a fresh interpreter has imported after ``scenario``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BUDGETD_", "LITELLM_", "DATABASE_URL", "REDIS_URL", "JWT_"))
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, scenario, str(tmp_path), json.dumps(WATCHED)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_importing_the_cli_loads_no_store_driver_jwt_or_http_library(tmp_path: Path) -> None:
    assert loaded("import", tmp_path) == set()


def test_serving_without_jwt_or_metrics_loads_only_its_own_store(tmp_path: Path) -> None:
    # The embedded default: SQLite and in-process counters; no PyJWT, cryptography, aiohttp.
    assert loaded("embedded", tmp_path) == {"server.storage.sqlite"}


def test_postgres_and_redis_stores_load_their_drivers_and_nothing_else(tmp_path: Path) -> None:
    assert loaded("services", tmp_path) == {
        "asyncpg",
        "redis",
        "server.storage.postgres",
        "server.storage.redis_counters",
    }


def test_jwt_auth_loads_the_verifier_when_it_is_configured(tmp_path: Path) -> None:
    # The control: the same start with JWT authentication on does load them.
    assert {"jwt", "cryptography.x509", "server.jwt_auth"} <= loaded("jwt", tmp_path)
