"""What the pipeline needs from the database, checked before anything is paid for: the items
table's shape, the role's rights, and the grants an administrator gives a least-privilege role.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.db.migrate import tables

# Column -> the types the pipeline works with (None: any).
REQUIRED_COLUMNS: dict[str, tuple[str, ...] | None] = {
    "id": None,
    "user_id": None,
    "image": None,
    "status": None,
    "metadata": ("jsonb",),
    "updated_at": ("timestamp with time zone", "timestamp without time zone"),
}
ITEMS_RIGHTS = ("SELECT", "UPDATE")
PIPELINE_RIGHTS = ("SELECT", "INSERT", "UPDATE", "DELETE")


def _rights() -> dict[str, tuple[str, ...]]:
    """Rights per pipeline table: the migrations' record is only read by a run."""
    return {
        t: ("SELECT",) if t == "enrich_schema_migrations" else PIPELINE_RIGHTS for t in tables()
    }


def items_problems(conn: psycopg.Connection, db: Database) -> list[str]:
    """One line per thing that would fail later, after the calls were paid."""
    qualified = db.items.as_string(conn)
    where = f"{db.settings.namespace}.{db.settings.table}"
    found = conn.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()
    if not found or found[0] is None:
        return [
            f"items table {where} does not exist (or this role cannot see it): check "
            "ADBPG_NAMESPACE / ADBPG_TABLE (--namespace / --table)"
        ]
    columns = dict(
        conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (qualified,),
        ).fetchall()
    )
    problems = []
    for name, types in REQUIRED_COLUMNS.items():
        if name not in columns:
            problems.append(f"items table {where} has no column {name!r}: the pipeline needs it")
        elif types is not None and columns[name] not in types:
            fix = " (ALTER TABLE ... TYPE jsonb USING metadata::jsonb)" * (name == "metadata")
            problems.append(
                f"items table {where}: column {name!r} is {columns[name]}, the pipeline needs "
                f"{' or '.join(types)}{fix}"
            )
    missing = [
        right
        for right in ITEMS_RIGHTS
        if not conn.execute("SELECT has_table_privilege(%s, %s)", (qualified, right)).fetchone()[0]  # type: ignore[index]
    ]
    if missing:
        problems.append(
            f"this role lacks {', '.join(missing)} on {where}: "
            f"GRANT {', '.join(ITEMS_RIGHTS)} ON {qualified} TO {_role(conn)}"
        )
    conn.commit()
    return problems


def pipeline_problems(conn: psycopg.Connection, namespace: str) -> list[str]:
    """The rights the role needs on the pipeline's own tables (created by the migrations)."""
    problems = []
    for table, rights in _rights().items():
        qualified = sql.Identifier(namespace, table).as_string(conn)
        missing = [
            right
            for right in rights
            if not conn.execute(
                "SELECT has_table_privilege(%s, %s)", (qualified, right)
            ).fetchone()[0]  # type: ignore[index]
        ]
        if missing:
            problems.append(f"this role lacks {', '.join(missing)} on {qualified}")
    conn.commit()
    if problems:
        problems.append(
            "an administrator runs `enrich-captions --setup --grant-to ROLE` to print the grants"
        )
    return problems


def owns_items(conn: psycopg.Connection, db: Database) -> bool:
    """Only the table's owner may add the pending-rows index."""
    row = conn.execute(
        "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = to_regclass(%s)",
        (db.items.as_string(conn),),
    ).fetchone()
    conn.commit()
    return bool(row and row[0])


def unaddressable(conn: psycopg.Connection, db: Database) -> tuple[int, int]:
    """Rows with a NULL id, and ids that more than one row shares: the pipeline addresses rows
    by id, so it leaves these alone (only asked where no unique index on id rules them out)."""
    row = conn.execute(
        sql.SQL(
            "SELECT (SELECT count(*) FROM {items} WHERE id IS NULL),"
            " (SELECT count(*) FROM (SELECT id FROM {items} WHERE id IS NOT NULL"
            " GROUP BY id HAVING count(*) > 1) AS d)"
        ).format(items=db.items)
    ).fetchone()
    conn.commit()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def grants(namespace: str, table: str, role: str) -> list[str]:
    """What a least-privilege role needs, once an administrator has run the set-up."""
    ns = sql.Identifier(namespace)
    quoted_role = sql.Identifier(role)
    statements: list[sql.Composable] = [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {};").format(ns, quoted_role),
        sql.SQL("GRANT {} ON {} TO {};").format(
            sql.SQL(", ").join(map(sql.SQL, ITEMS_RIGHTS)),
            sql.Identifier(namespace, table),
            quoted_role,
        ),
    ]
    for rights in dict.fromkeys(_rights().values()):
        statements.append(
            sql.SQL("GRANT {} ON {} TO {};").format(
                sql.SQL(", ").join(map(sql.SQL, rights)),
                sql.SQL(", ").join(
                    sql.Identifier(namespace, t) for t, r in _rights().items() if r == rights
                ),
                quoted_role,
            )
        )
    return [s.as_string(None) for s in statements]


def _role(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    return sql.Identifier(str(row[0]) if row else "ROLE").as_string(conn)
