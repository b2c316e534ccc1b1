"""The database as users have it: odd items tables, least-privilege roles, concurrent first
runs, hand-written tags, and a failover in the middle of a run. Each test builds the hostile
condition for real and asserts what the user sees and what is left in the database."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from enrich_pipeline.db.pending_index import INDEX_SUFFIX
from enrich_pipeline.db.store import Store
from enrich_pipeline_tests.helpers import (
    Items,
    TcpProxy,
    good_chat_calls,
    hues,
    log_writes,
    paint,
    run_cli,
    writes,
)
from enrich_pipeline_tests.standin import StandIn


def pipeline_tables(items: Items, namespace: str | None = None) -> int:
    return items.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename LIKE 'enrich%%'",
        (namespace or items.namespace,),
    )[0][0]


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The merge never replaces what a person wrote


def test_hand_written_tags_and_colors_are_kept(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path
) -> None:
    (path,) = paint(tmp_path, hues(1))
    mine = items.add(
        "alice",
        str(path),
        metadata={
            "caption": "",
            "style_tags": ["handmade"],
            "dominant_colors": ["chartreuse"],
            "object_tags": [],
            "sku": "A-1",
        },
    )
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    md = items.row(mine)["metadata"]
    assert md["caption"]  # the empty caption is filled in
    assert md["style_tags"] == ["handmade"] and md["dominant_colors"] == ["chartreuse"]
    assert md["object_tags"]  # an empty list is no one's work: the pipeline's tags go there
    assert md["sku"] == "A-1"


# ---------------------------------------------------------------------------------------------
# Items tables of the wrong shape stop before anything is paid for


def odd_table(items: Items, ddl: str) -> str:
    """A fresh namespace with an items table of this shape; returns the namespace."""
    ns = f"odd_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(ns)))
        conn.execute(sql.SQL(ddl).format(items=sql.Identifier(ns, "items")))
    return ns


@pytest.mark.parametrize(
    ("ddl", "named"),
    [
        (
            "CREATE TABLE {items} (id bigserial PRIMARY KEY, user_id text, image text,"
            " status text, metadata json, updated_at timestamptz)",
            "'metadata' is json",
        ),
        (
            "CREATE TABLE {items} (id bigserial PRIMARY KEY, user_id text, image text,"
            " status text, metadata jsonb)",
            "no column 'updated_at'",
        ),
    ],
)
def test_wrong_items_table_shape_is_one_line_before_any_call(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    capsys: pytest.CaptureFixture[str],
    ddl: str,
    named: str,
    tmp_path: Path,
) -> None:
    ns = odd_table(items, ddl)
    (path,) = paint(tmp_path, hues(1))
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (user_id, image, status) VALUES ('alice', %s, 'active')"
            ).format(sql.Identifier(ns, "items")),
            (str(path),),
        )
    env.setenv("ADBPG_NAMESPACE", ns)
    code, _ = run_cli(["--user-id", "alice"])
    (line,) = errors(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: ") and named in line, line
    assert good_chat_calls(standin) == 0
    assert pipeline_tables(items, ns) == 0, "nothing is created for a table the run cannot write"


def test_mistyped_namespace_creates_nothing(
    env: pytest.MonkeyPatch, items: Items, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = f"typo_{uuid.uuid4().hex[:6]}"
    env.setenv("ADBPG_NAMESPACE", typo)
    code, _ = run_cli([])
    (line,) = errors(capsys.readouterr().err)
    assert code == 2 and "does not exist" in line and "ADBPG_NAMESPACE" in line, line
    assert items.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (typo,)) == [(0,)]


def test_rows_without_a_usable_id_are_reported_and_left_alone(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path
) -> None:
    ns = odd_table(
        items,
        "CREATE TABLE {items} (id bigint, user_id text, image text, status text,"
        " metadata jsonb, updated_at timestamptz DEFAULT now())",
    )
    paths = paint(tmp_path, hues(4))
    table = sql.Identifier(ns, "items")
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        for item_id, path in zip([None, 7, 7, 8], paths, strict=True):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, user_id, image, status, metadata)"
                    " VALUES (%s, 'alice', %s, 'active', '{{}}')"
                ).format(table),
                (item_id, str(path)),
            )
    env.setenv("ADBPG_NAMESPACE", ns)
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert "1 row(s) without an id and 1 id(s) shared by several rows" in report
    with psycopg.connect(items.conninfo) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, metadata->>'caption' FROM {} ORDER BY id NULLS FIRST").format(table)
        ).fetchall()
    assert [caption is not None for _, caption in rows] == [False, False, False, True]


def test_a_trigger_that_raises_for_one_row_costs_only_that_row(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path
) -> None:
    ids = [items.add("alice", str(p)) for p in paint(tmp_path, hues(4))]
    items.execute(
        "CREATE FUNCTION {ns}.refuse() RETURNS trigger LANGUAGE plpgsql AS $f$"
        f" BEGIN IF NEW.id = {int(ids[1])} THEN RAISE EXCEPTION 'row % is frozen', NEW.id;"
        " END IF; RETURN NEW; END $f$"
        ";CREATE TRIGGER refuse BEFORE UPDATE ON {items}"
        " FOR EACH ROW EXECUTE FUNCTION {ns}.refuse()"
    )
    code, report = run_cli(["--user-id", "alice", "--batch-size", "4"])
    assert code == 0, report
    captions = {i: items.row(i)["metadata"].get("caption") for i in ids}
    assert captions[ids[1]] is None
    assert all(captions[i] for i in ids if i != ids[1])
    ledger = items.execute(
        "SELECT item_id, error_code, permanent FROM {ns}.enrich_failures ORDER BY item_id"
    )
    assert ledger == [(ids[1], "write_failed", True)]
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims") == [(0,)]


# ---------------------------------------------------------------------------------------------
# A least-privilege role


@pytest.fixture
def runner_role(items: Items) -> Iterator[tuple[str, str]]:
    role, password = f"runner_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex[:8]
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(items.namespace), sql.Identifier(role)
            )
        )
        conn.execute(
            sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(items.ident, sql.Identifier(role))
        )
    yield role, password
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def as_role(conninfo: str, role: str, password: str) -> str:
    params = conninfo_to_dict(conninfo)
    params.update(user=role, password=password)
    return make_conninfo(**params)


def test_least_privilege_role_runs_with_exactly_the_listed_grants(
    env: pytest.MonkeyPatch,
    items: Items,
    runner_role: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    role, password = runner_role
    ids = [items.add("alice", str(p)) for p in paint(tmp_path, hues(3))]
    admin_url = items.conninfo

    # Before the set-up: one line saying who must do what, nothing created, nothing paid.
    env.setenv("ADBPG_URL", as_role(admin_url, role, password))
    code, _ = run_cli(["--user-id", "alice"])
    (line,) = errors(capsys.readouterr().err)
    assert code == 2 and "enrich-captions --setup" in line, line
    assert pipeline_tables(items) == 0

    # The administrator's set-up prints the grants; they are all the role gets.
    env.setenv("ADBPG_URL", admin_url)
    code, printed = run_cli(["--setup", "--grant-to", role])
    assert code == 0, printed
    grants = [g.strip() for g in printed.splitlines() if g.strip().startswith("GRANT ")]
    assert len(grants) >= 3 and all(f'"{role}"' in g for g in grants)
    assert "Pending index:  present" in printed
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for grant in grants:
            conn.execute(grant)
        # The index is the owner's to make; without it the role still runs, and is told.
        conn.execute(
            sql.SQL("DROP INDEX {}").format(
                sql.Identifier(items.namespace, f"{items.table}{INDEX_SUFFIX}")
            )
        )

    env.setenv("ADBPG_URL", as_role(admin_url, role, password))
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report + capsys.readouterr().err
    assert "pending-rows index is missing" in report
    assert all(items.row(i)["metadata"].get("caption") for i in ids)


# ---------------------------------------------------------------------------------------------
# Concurrent first runs


def test_concurrent_first_runs_set_up_once_without_deadlock(items: Items) -> None:
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (user_id, image, status, metadata)"
                " SELECT 'u' || (g % 50), 'https://img.example.test/' || g || '.jpg', 'active',"
                " '{{}}'::jsonb FROM generate_series(1, 30000) AS g"
            ).format(items.ident)
        )
    failures: list[BaseException] = []
    start = threading.Barrier(3)

    def first_run() -> None:
        store = Store(items.settings)
        try:
            start.wait()
            store.setup()
            assert store.readiness is not None and store.readiness.pending_index
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            store.close()

    runs = [threading.Thread(target=first_run) for _ in range(3)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=120)
    assert failures == []
    valid = items.execute(
        "SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = to_regclass(%s)",
        (f"{items.namespace}.{items.table}{INDEX_SUFFIX}",),
    )
    assert valid == [(True,)]
    assert items.execute("SELECT count(*) FROM {ns}.enrich_schema_migrations")[0][0] >= 3


# ---------------------------------------------------------------------------------------------
# Append-optimized items tables: no UPDATE ... RETURNING


def test_written_rows_are_read_back_where_returning_is_not_relied_on(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path
) -> None:
    from dataclasses import replace

    from enrich_pipeline.enrichment.records import ItemError, PendingItem, Provenance, WorkItem
    from enrich_pipeline.pipeline import stages

    ids = [items.add("alice", str(p)) for p in paint(tmp_path, hues(3))]
    items.write_by_hand(ids[2], caption="theirs")
    with Store(items.settings) as store:
        store.setup()
        store.db.dialect = replace(store.db.dialect, items_returning=False)
        works = [WorkItem(PendingItem(i, "alice", items.row(i)["image"], {})) for i in ids]
        for n, work in enumerate(works):
            work.caption = f"caption {n}"
        works[1].fail(ItemError("bad_image", "no", True, "image"))
        chunk = stages.Chunk("alice", "w", works)
        result = stages.write_chunk(
            store, chunk, provenance=Provenance("m", "v1"), embedding_model=None
        )
    status = {o.item_id: o.status for o in result.outcomes}
    assert status == {ids[0]: "succeeded", ids[1]: "failed", ids[2]: "skipped"}
    assert items.row(ids[0])["metadata"]["caption"] == "caption 0"
    assert items.row(ids[2])["metadata"]["caption"] == "theirs"


# ---------------------------------------------------------------------------------------------
# A 30-second failover in the middle of a run

OUTAGE = 30.0


def test_a_30_second_failover_mid_run_waits_and_writes_every_row_once(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = [items.add("alice", str(p)) for p in paint(tmp_path, hues(12))]
    log_writes(items)
    standin.latency = 0.3
    with TcpProxy(items.conninfo) as proxy:
        env.setenv("ADBPG_URL", proxy.conninfo)
        env.setenv("ADBPG_CONNECT_TIMEOUT", "2")
        outcome: dict[str, object] = {}

        def run() -> None:
            outcome["result"] = run_cli(
                ["--user-id", "alice", "--batch-size", "2", "--concurrent", "2"]
            )

        caplog.set_level(logging.WARNING)
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while not writes(items) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writes(items), "the first chunk is written before the outage"
        started = time.monotonic()
        proxy.outage(OUTAGE)
        thread.join(timeout=OUTAGE + 120)
        assert not thread.is_alive()
    code, report = outcome["result"]  # type: ignore[misc]
    assert code == 0, report
    assert time.monotonic() - started >= OUTAGE
    assert all(items.row(i)["metadata"].get("caption") for i in ids)
    assert set(writes(items).values()) == {1}, "every row written exactly once"
    waits = [
        r
        for r in caplog.records
        if r.name == "enrich_pipeline.db.database" and "waiting up to" in r.getMessage()
    ]
    assert len(waits) == 1, [r.getMessage() for r in waits]


def test_non_finite_vectors_already_stored_are_caught_by_the_check_figures(items: Items) -> None:
    with Store(items.settings) as store:
        store.setup()
        for n, vector in enumerate([[1.0, 0.0], [float("nan"), 1.0], [float("inf"), 0.0]]):
            items.execute(
                "INSERT INTO {ns}.enrich_embeddings (source_table, item_id, user_id, model,"
                " dimensions, embedding) VALUES (%s, %s, 'alice', 'm', 2, %s::real[])",
                (store.source_table, str(n), vector),
            )
        figures = store.items.check_partition("alice", 2)
    assert figures["embeddings"] == 3
    assert figures["embeddings_not_finite"] == 2
    assert figures["embeddings_wrong_dimensions"] == 0


def test_a_role_without_rights_on_the_schema_is_one_line(
    env: pytest.MonkeyPatch,
    items: Items,
    runner_role: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    role, password = runner_role
    assert run_cli(["--setup"])[0] == 0  # the tables exist; the role has no grant on them
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(
                sql.Identifier(items.namespace), sql.Identifier(role)
            )
        )
    env.setenv("ADBPG_URL", as_role(items.conninfo, role, password))
    code, _ = run_cli(["--user-id", "alice"])
    lines = errors(capsys.readouterr().err)
    assert code == 2 and lines and all(line.startswith("error: ") for line in lines), lines
    assert "Traceback" not in "\n".join(lines)
