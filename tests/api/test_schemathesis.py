"""Schemathesis against a real gunicorn: /openapi.json is what the server accepts and answers.

Every check (``--checks all``), positive and negative cases, the stateful phase along
the document's links (POST /batch and Sinch send to the operations that take their
ids), bounded examples and a fixed seed, with a real API key and the account's id as
the Sinch ``service_plan_id`` and the 8x8 ``subAccountId``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from dispatcher import health
from dispatcher.config import Settings
from tests.api.live import gunicorn
from tests.factories import Tenant

SEED = 20261129
EXAMPLES = 6

# Requests the document allows that the server refuses on purpose, with a 400 that names
# the field: what a JSON Schema cannot say. A schema-valid number may not be possible for
# its country (phonenumbers' ranges), and a well-formed callback host may be private.
# The vendors' status webhooks (/providers/...) answer 401/403 to anything without the
# vendor's signature, which no schema can generate.
CONFIG = """
[parameters]
service_plan_id = "{account}"
sub_account_id = "{account}"

[checks.positive_data_acceptance]
expected-statuses = [200, 201, 202, 204, 400, 401, 403, 404, 409]
"""


@pytest.mark.timeout(240)
def test_the_server_matches_its_openapi_document(
    settings: Settings, tenant: Tenant, tmp_path: Path
) -> None:
    # One writer at a time on SQLite: a single gunicorn worker there.
    workers = 1 if settings.database_url.startswith("sqlite") else 2
    # /health/ready wants a worker per queue; these stand in for them (no worker runs here).
    beats = redis.Redis.from_url(settings.redis_url)
    health.beat(client=beats, queues=health.QUEUES, hostname="schemathesis@test", ttl=600)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(account=tenant.id))
    with gunicorn(settings, tmp_path, workers=workers) as live:
        argv = [
            str(Path(sys.executable).with_name("st")),
            "--config-file",
            str(config),
            "run",
            f"{live.url}/openapi.json",
            "--checks",
            "all",
            "--mode",
            "all",
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "-H",
            f"Authorization: Bearer {tenant.key}",
            "--no-color",
            # The coverage phase enumerates every boundary of every field (thousands of
            # requests here): bounded random examples and the link walk stay under a minute.
            "--phases",
            "examples,fuzzing,stateful",
        ]
        log = tmp_path / "schemathesis.log"
        with log.open("w") as out:
            result = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its cache (.schemathesis/) goes under the test's own directory.
                cwd=tmp_path,
                timeout=150,
                check=False,
            )
    health.forget(client=beats, queues=health.QUEUES, hostname="schemathesis@test")
    beats.close()
    if result.returncode != 0:
        pytest.fail(log.read_text()[-20000:])
