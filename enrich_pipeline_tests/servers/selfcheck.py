"""``python -m enrich_pipeline_tests.servers selfcheck``: both profiles started and verified.

Checks that the gp6 catalog refuses what GP6 refuses and keeps what 9.4 had (in new databases
too, including those made from template0), that pg12's catalog is untouched, that
``forbidden_statements`` flags what it should and nothing else, and that stop() leaves no
postmaster behind. Prints what it measured; needs psycopg.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from enrich_pipeline.db.embedded import process_alive
from enrich_pipeline_tests.servers.binaries import default_cache_dir, ensure_pg12
from enrich_pipeline_tests.servers.cluster import PROFILES, Server, start_server
from enrich_pipeline_tests.servers.gp6 import JSONB_94_FUNCTIONS, MUST_FAIL, MUST_WORK
from enrich_pipeline_tests.servers.statement_log import forbidden_statements


def selfcheck(verbose: bool = False) -> int:
    """Start both profiles, check the gp6 catalog and the log scan, stop them; 0 when all hold."""
    try:
        import psycopg
    except ImportError:
        print("selfcheck needs psycopg (pip install 'psycopg[binary]')", file=sys.stderr)
        return 2

    failures: list[str] = []
    passed = [0]

    def check(ok: bool, what: str) -> None:
        if verbose or not ok:
            print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if ok:
            passed[0] += 1
        else:
            failures.append(what)

    def section_done(name: str) -> None:
        print(f"  {name}: {passed[0]} checks passed")
        passed[0] = 0

    def connect(uri: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(uri, autocommit=True, connect_timeout=10)

    def error_of(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> str | None:
        try:
            conn.execute(sql).fetchall()
        except psycopg.Error as exc:
            return str(exc).splitlines()[0]
        return None

    t0 = time.monotonic()
    cache = default_cache_dir()
    cached = any(cache.glob("*/.complete"))
    pg_root = ensure_pg12(cache)
    print(
        f"fetch: {time.monotonic() - t0:.2f}s ({'cache existed' if cached else 'fresh'}) -> "
        f"{pg_root}"
    )

    with tempfile.TemporaryDirectory(prefix="pg_servers-selfcheck-") as tmp_s:
        tmp = Path(tmp_s)
        servers: dict[str, Server] = {}
        try:
            for profile in PROFILES:
                servers[profile] = start_server(profile, tmp / profile)
                srv = servers[profile]
                shown = ", ".join(
                    f"{k}={v:.2f}s" for k, v in srv.timings.items() if k != "template_cached"
                )
                tag = "cached template" if srv.timings.get("template_cached") else "new template"
                print(f"{profile}: {srv.uri} as {srv.run_as_user} ({tag}; {shown})")

            gp6, pg12 = servers["gp6"], servers["pg12"]
            print("gp6 catalog:")
            with connect(gp6.uri) as conn:
                conn.execute("CREATE DATABASE x")
                conn.execute("CREATE DATABASE y TEMPLATE template0")
            for db in ("x", "y", "postgres"):
                with connect(gp6.dsn(db)) as conn:
                    for sql, expected in MUST_FAIL:
                        err = error_of(conn, sql)
                        check(err is not None and expected in err, f"[{db}] fails: {sql} ({err})")
                    row = conn.execute(
                        "SELECT to_regprocedure('jsonb_concat(jsonb,jsonb)') IS NULL"
                    ).fetchone()
                    check(row is not None and row[0] is True, f"[{db}] jsonb_concat proc gone")
                    for sql, expected in MUST_WORK:
                        row = conn.execute(sql).fetchone()
                        got = None if row is None else str(row[0])
                        check(got == expected, f"[{db}] works: {sql} -> {got!r}")
                    leftovers = {
                        r[0]
                        for r in conn.execute(
                            "SELECT p.proname FROM pg_proc p WHERE p.proname ~ 'jsonb|jsonpath'"
                            " OR p.prorettype = 'jsonb'::regtype"
                            " OR 'jsonb'::regtype = ANY(p.proargtypes::oid[])"
                        )
                    } - JSONB_94_FUNCTIONS
                    check(not leftovers, f"[{db}] only 9.4 jsonb functions left {leftovers or ''}")
                    conn.execute("CREATE TABLE j (id int, doc jsonb)")
                    conn.execute(
                        "INSERT INTO j SELECT g, json_build_object('k', g)::jsonb"
                        " FROM generate_series(1, 200) g"
                    )
                    conn.execute("CREATE INDEX ON j USING gin (doc)")
                    conn.execute("CREATE INDEX ON j USING gin (doc jsonb_path_ops)")
                    conn.execute("CREATE INDEX ON j (doc)")
                    conn.execute("SET enable_seqscan = off")
                    row = conn.execute(
                        "SELECT count(*) FROM j WHERE doc @> '{\"k\": 7}'"
                    ).fetchone()
                    check(row == (1,), f"[{db}] GIN @> lookup works -> {row}")
                    row = conn.execute(
                        "SELECT count(DISTINCT doc) FROM (SELECT doc FROM j ORDER BY doc) s"
                    ).fetchone()
                    check(row == (200,), f"[{db}] btree ordering/distinct on jsonb -> {row}")
                    cur = conn.cursor(binary=True)
                    row = cur.execute("SELECT '{\"a\": [1, 2]}'::jsonb").fetchone()
                    check(row == ({"a": [1, 2]},), f"[{db}] jsonb binary send/recv -> {row}")
                    conn.execute("DROP TABLE j")

            section_done("gp6 catalog (databases x, y from template0, postgres)")
            print("pg12 catalog untouched:")
            with connect(pg12.uri) as conn:
                conn.execute("CREATE DATABASE x")
            with connect(pg12.dsn("x")) as conn:
                row = conn.execute("SELECT ('{\"a\":1}'::jsonb || '{\"b\":2}')::text").fetchone()
                check(row == ('{"a": 1, "b": 2}',), f"jsonb || jsonb works -> {row}")
                row = conn.execute("SELECT jsonb_build_object('a', 1)::text").fetchone()
                check(row == ('{"a": 1}',), f"jsonb_build_object works -> {row}")

            section_done("pg12 catalog")
            print("forbidden_statements:")
            # CR, tab-led lines and a trailing newline must survive the log round trip exactly.
            tricky = "SELECT id\r\n\t, v FROM q\r\n\tWHERE v <> 'x'\n FOR SHARE SKIP LOCKED\n"
            for srv in (pg12, gp6):
                with connect(srv.dsn("x")) as conn:
                    conn.execute("CREATE TABLE q (id int PRIMARY KEY, v text)")
                    conn.execute("INSERT INTO q VALUES (1, 'a'), (2, 'b')")
                    conn.execute("SELECT id FROM q WHERE v = 'SKIP LOCKED' ORDER BY id")
                    conn.execute("SELECT id, v FROM q ORDER BY id")
                    with conn.transaction():
                        conn.execute(
                            "SELECT id\n  FROM q\n WHERE id > %s\n FOR UPDATE SKIP LOCKED", (0,)
                        )
                    conn.execute("SELECT * FROM q, LATERAL (SELECT q.id + 1 AS n) s")
                    conn.execute("CREATE INDEX CONCURRENTLY q_v ON q (v)")
                    conn.execute("CREATE INDEX q_vi ON q (v) INCLUDE (id)")
                    conn.execute(
                        'CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY, "include" int)'
                    )
                    conn.execute("-- LATERAL in a comment only\nSELECT 1")
                    conn.execute("SELECT E'it''s \\' LATERAL' AS escaped_string")
                    conn.execute(
                        "DO $body$ BEGIN PERFORM 1 FROM q FOR UPDATE SKIP LOCKED; END $body$"
                    )
                    conn.execute(tricky)
                found = forbidden_statements(srv.log_path, allow=[r"CREATE INDEX CONCURRENTLY q_v"])
                print(f"  {srv.profile}: {len(found)} flagged")
                for st in found:
                    print("    | " + st.replace("\n", "\n    | "))
                check(
                    any("FOR UPDATE SKIP LOCKED" in s and "WHERE id > $1" in s for s in found),
                    f"{srv.profile}: multi-line SELECT ... FOR UPDATE SKIP LOCKED flagged",
                )
                check(
                    not any(s.startswith("SELECT id, v FROM q") for s in found),
                    f"{srv.profile}: plain select not flagged",
                )
                check(
                    not any("'SKIP LOCKED'" in s for s in found),
                    f"{srv.profile}: string literal not flagged",
                )
                check(
                    not any("in a comment only" in s for s in found),
                    f"{srv.profile}: comment not flagged",
                )
                check(any("LATERAL (SELECT" in s for s in found), f"{srv.profile}: LATERAL flagged")
                check(any("INCLUDE (id)" in s for s in found), f"{srv.profile}: INCLUDE flagged")
                check(any("AS IDENTITY" in s for s in found), f"{srv.profile}: identity flagged")
                check(
                    not any("CONCURRENTLY" in s for s in found),
                    f"{srv.profile}: allow-listed CONCURRENTLY exempt",
                )
                check(
                    len(forbidden_statements(srv.log_path)) == len(found) + 1,
                    f"{srv.profile}: CONCURRENTLY flagged without allow",
                )
                check(tricky in found, f"{srv.profile}: CR/tab statement recovered verbatim")
                check(
                    any(s.startswith("DO $body$") for s in found),
                    f"{srv.profile}: SKIP LOCKED inside a DO body flagged",
                )
                check(
                    not any("escaped_string" in s for s in found),
                    f"{srv.profile}: E'' string with \\' not flagged",
                )
                check(len(found) == 6, f"{srv.profile}: exactly 6 flagged")
        finally:
            for srv in servers.values():
                t0 = time.monotonic()
                pid = srv.pid
                srv.stop()
                gone = pid is None or not process_alive(pid)
                print(f"stop {srv.profile}: {time.monotonic() - t0:.2f}s")
                check(gone, f"{srv.profile}: postmaster {pid} gone after stop")

    section_done("forbidden_statements and stop")
    if failures:
        print(f"selfcheck: FAILED ({len(failures)} checks)")
        return 1
    print("selfcheck: OK")
    return 0
