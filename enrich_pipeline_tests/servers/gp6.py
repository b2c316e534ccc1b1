"""The gp6 profile's catalog: PostgreSQL 12 without the jsonb/jsonpath entries 9.4 lacked.

The pipeline targets AnalyticDB for PostgreSQL 6.0 (Greenplum 6, PostgreSQL 9.4 based), which
cannot be installed here. A stock PostgreSQL 12 accepts far more SQL than the target does, so
the gp6 template's catalog has the entries below deleted, in single-user mode, before any server
starts from it. ``JSONB_94_FUNCTIONS``, ``MUST_FAIL`` and ``MUST_WORK`` are what ``selfcheck``
verifies afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from enrich_pipeline_tests.servers.process import run_checked
from enrich_pipeline_tests.servers.system_user import RunAs

# Source of truth: PostgreSQL 9.4 docs, "JSON Functions and Operators" (tables 9-40..9-42), and
# the release notes of 9.5 (E.x "JSON": jsonb ||, -, #-, jsonb_set, jsonb_pretty,
# jsonb_strip_nulls/json_strip_nulls, to_jsonb, jsonb_build_object/array, jsonb_object,
# jsonb_agg, jsonb_object_agg), 9.6 (jsonb_insert), 10 (jsonb - text[]; to_tsvector and
# ts_headline for json/jsonb), 11 (jsonb casts to bool/numeric/int/float;
# json(b)_to_tsvector) and 12 (SQL/JSON path: jsonpath type, jsonb_path_*, @?, @@).
# Greenplum 6 / AnalyticDB 6.0 carry 9.4's set, so everything below is absent there.
# Kept on purpose: jsonb I/O, comparison/hash/GIN support (jsonb_hash_extended included: it is
# hash-opclass plumbing from 11 that SQL never calls by name, and removing it would mean editing
# pg_amproc), and every json (not jsonb) function 9.4 already had.
# OIDs are fixed by PostgreSQL 12's pg_proc.dat; the strip step checks each OID still has the
# listed signature, so a different build fails loudly instead of stripping the wrong rows.

GP6_STRIP_FUNCTIONS: tuple[tuple[int, str], ...] = (
    # 9.5: operators' implementation functions and modifiers
    (3301, "jsonb_concat(jsonb,jsonb)"),
    (3302, "jsonb_delete(jsonb,text)"),
    (3303, "jsonb_delete(jsonb,integer)"),
    (3304, "jsonb_delete_path(jsonb,text[])"),
    (3305, "jsonb_set(jsonb,text[],jsonb,boolean)"),
    (3306, "jsonb_pretty(jsonb)"),
    (3262, "jsonb_strip_nulls(jsonb)"),
    (3261, "json_strip_nulls(json)"),
    # 9.5: jsonb constructors and aggregates (aggregates also live in pg_aggregate)
    (3787, "to_jsonb(anyelement)"),
    (3271, 'jsonb_build_array("any")'),
    (3272, "jsonb_build_array()"),
    (3273, 'jsonb_build_object("any")'),
    (3274, "jsonb_build_object()"),
    (3263, "jsonb_object(text[])"),
    (3264, "jsonb_object(text[],text[])"),
    (3267, "jsonb_agg(anyelement)"),
    (3265, "jsonb_agg_transfn(internal,anyelement)"),
    (3266, "jsonb_agg_finalfn(internal)"),
    (3270, 'jsonb_object_agg("any","any")'),
    (3268, 'jsonb_object_agg_transfn(internal,"any","any")'),
    (3269, "jsonb_object_agg_finalfn(internal)"),
    # 9.6
    (3579, "jsonb_insert(jsonb,text[],jsonb,boolean)"),
    # 10
    (3343, "jsonb_delete(jsonb,text[])"),
    (4209, "to_tsvector(jsonb)"),
    (4211, "to_tsvector(regconfig,jsonb)"),
    (4210, "to_tsvector(json)"),
    (4212, "to_tsvector(regconfig,json)"),
    (4201, "ts_headline(regconfig,jsonb,tsquery,text)"),
    (4202, "ts_headline(regconfig,jsonb,tsquery)"),
    (4203, "ts_headline(jsonb,tsquery,text)"),
    (4204, "ts_headline(jsonb,tsquery)"),
    (4205, "ts_headline(regconfig,json,tsquery,text)"),
    (4206, "ts_headline(regconfig,json,tsquery)"),
    (4207, "ts_headline(json,tsquery,text)"),
    (4208, "ts_headline(json,tsquery)"),
    # 11: casts jsonb -> scalar (their pg_cast rows are removed with them)
    (3556, "bool(jsonb)"),
    (3449, '"numeric"(jsonb)'),
    (3450, "int2(jsonb)"),
    (3451, "int4(jsonb)"),
    (3452, "int8(jsonb)"),
    (3453, "float4(jsonb)"),
    (2580, "float8(jsonb)"),
    (4213, "jsonb_to_tsvector(jsonb,jsonb)"),
    (4214, "jsonb_to_tsvector(regconfig,jsonb,jsonb)"),
    (4215, "json_to_tsvector(json,jsonb)"),
    (4216, "json_to_tsvector(regconfig,json,jsonb)"),
    # 12: SQL/JSON path
    (4005, "jsonb_path_exists(jsonb,jsonpath,jsonb,boolean)"),
    (4006, "jsonb_path_query(jsonb,jsonpath,jsonb,boolean)"),
    (4007, "jsonb_path_query_array(jsonb,jsonpath,jsonb,boolean)"),
    (4008, "jsonb_path_query_first(jsonb,jsonpath,jsonb,boolean)"),
    (4009, "jsonb_path_match(jsonb,jsonpath,jsonb,boolean)"),
    (4010, "jsonb_path_exists_opr(jsonb,jsonpath)"),
    (4011, "jsonb_path_match_opr(jsonb,jsonpath)"),
    (4001, "jsonpath_in(cstring)"),
    (4002, "jsonpath_recv(internal)"),
    (4003, "jsonpath_out(jsonpath)"),
    (4004, "jsonpath_send(jsonpath)"),
)

GP6_STRIP_OPERATORS: tuple[tuple[int, str], ...] = (
    (3284, "||(jsonb,jsonb)"),  # 9.5
    (3285, "-(jsonb,text)"),  # 9.5
    (3286, "-(jsonb,integer)"),  # 9.5
    (3287, "#-(jsonb,text[])"),  # 9.5
    (3398, "-(jsonb,text[])"),  # 10
    (4012, "@?(jsonb,jsonpath)"),  # 12; also in GIN jsonb_ops/jsonb_path_ops (pg_amop)
    (4013, "@@(jsonb,jsonpath)"),  # 12; idem
)

# Removing the type makes '$.a'::jsonpath fail as it does on GP6, instead of leaving a type that
# nothing can use.
GP6_STRIP_TYPES: tuple[tuple[int, str], ...] = (
    (4072, "jsonpath"),
    (4073, "jsonpath[]"),
)


def _oid_list(items: Iterable[tuple[int, str]]) -> str:
    return ", ".join(str(oid) for oid, _ in items)


def strip_sql() -> str:
    """One DO block (one transaction) for single-user mode.

    It contains no ";" followed by a blank line, because that ends a command under ``-j``.
    """
    checks: list[str] = []
    for table, cast, items in (
        ("pg_proc", "regprocedure", GP6_STRIP_FUNCTIONS),
        ("pg_operator", "regoperator", GP6_STRIP_OPERATORS),
        ("pg_type", "regtype", GP6_STRIP_TYPES),
    ):
        for oid, sig in items:
            quoted = sig.replace("'", "''")
            checks.append(
                f"  IF (SELECT x.oid::{cast}::text FROM pg_catalog.{table} x WHERE x.oid = {oid})"
                f" IS DISTINCT FROM '{quoted}' THEN\n"
                f"    RAISE EXCEPTION 'gp6 strip: oid {oid} is not {quoted}';\n"
                "  END IF;"
            )
    procs = _oid_list(GP6_STRIP_FUNCTIONS)
    oprs = _oid_list(GP6_STRIP_OPERATORS)
    types = _oid_list(GP6_STRIP_TYPES)
    # Afterwards nothing may still point at a removed row: a dangling reference would show up as
    # a confusing "cache lookup failed" in a test instead of GP6's "does not exist".
    dangling = {
        "pg_proc uses stripped type": f"SELECT 1 FROM pg_proc WHERE prorettype IN ({types}) OR"
        f" proargtypes::oid[] && ARRAY[{types}]::oid[]",
        "pg_operator uses stripped proc/type": f"SELECT 1 FROM pg_operator WHERE oprcode::oid IN"
        f" ({procs}) OR oprleft IN ({types}) OR oprright IN ({types}) OR oprresult IN ({types})"
        f" OR oprcom IN ({oprs}) OR oprnegate IN ({oprs})",
        "pg_aggregate uses stripped proc": f"SELECT 1 FROM pg_aggregate WHERE aggtransfn::oid IN"
        f" ({procs}) OR aggfinalfn::oid IN ({procs}) OR aggcombinefn::oid IN ({procs})",
        "pg_cast uses stripped proc/type": f"SELECT 1 FROM pg_cast WHERE castfunc IN ({procs}) OR"
        f" castsource IN ({types}) OR casttarget IN ({types})",
        "pg_amop uses stripped operator": f"SELECT 1 FROM pg_amop WHERE amopopr IN ({oprs}) OR"
        f" amoplefttype IN ({types}) OR amoprighttype IN ({types})",
        "pg_amproc uses stripped proc": f"SELECT 1 FROM pg_amproc WHERE amproc::oid IN ({procs})",
        "pg_type uses stripped proc/type": f"SELECT 1 FROM pg_type WHERE typelem IN ({types}) OR"
        f" typarray IN ({types}) OR typinput::oid IN ({procs}) OR typoutput::oid IN ({procs})"
        f" OR typreceive::oid IN ({procs}) OR typsend::oid IN ({procs})",
    }
    dangling_checks = [
        f"  IF EXISTS ({query}) THEN\n    RAISE EXCEPTION 'gp6 strip: {what}';\n  END IF;"
        for what, query in dangling.items()
    ]
    body = "\n".join(
        [
            *checks,
            f"  DELETE FROM pg_aggregate WHERE aggfnoid::oid IN ({procs});",
            f"  DELETE FROM pg_amop WHERE amopopr IN ({oprs});",
            (
                f"  DELETE FROM pg_cast WHERE castfunc IN ({procs})"
                f" OR castsource IN ({types}) OR casttarget IN ({types});"
            ),
            f"  DELETE FROM pg_operator WHERE oid IN ({oprs});",
            f"  DELETE FROM pg_proc WHERE oid IN ({procs});",
            f"  DELETE FROM pg_type WHERE oid IN ({types});",
            # Comments and pin rows are harmless but would keep the OIDs visible to tools.
            (
                "  DELETE FROM pg_description WHERE"
                f" (classoid = 'pg_proc'::regclass AND objoid IN ({procs}))"
                f" OR (classoid = 'pg_operator'::regclass AND objoid IN ({oprs}))"
                f" OR (classoid = 'pg_type'::regclass AND objoid IN ({types}));"
            ),
            (
                "  DELETE FROM pg_depend WHERE"
                f" (refclassid = 'pg_proc'::regclass AND refobjid IN ({procs}))"
                f" OR (refclassid = 'pg_operator'::regclass AND refobjid IN ({oprs}))"
                f" OR (refclassid = 'pg_type'::regclass AND refobjid IN ({types}));"
            ),
            *dangling_checks,
        ]
    )
    return f"DO $gp6strip$\nBEGIN\n{body}\nEND\n$gp6strip$;\n\n"


# template0 is stripped too so that CREATE DATABASE ... TEMPLATE template0 (used for non-default
# encodings/locales) cannot bring the functions back.
_GP6_STRIP_DATABASES = ("template1", "template0", "postgres")


def strip_catalog(pg_root: Path, data: Path, run_as: RunAs) -> None:
    # Single-user mode, before any postmaster exists: -O is allow_system_table_mods (a
    # postmaster-only setting in 12), nothing reaches the statement log, and the running server
    # never has catalog edits enabled for tests to trip over.
    sql = strip_sql()
    for db in _GP6_STRIP_DATABASES:
        argv = [
            str(pg_root / "bin" / "postgres"),
            "--single",
            "-D",
            str(data),
            "-O",
            "-j",
            "-F",
            "-c",
            "exit_on_error=on",
            "-c",
            "search_path=pg_catalog",
            db,
        ]
        run_checked(run_as.command(argv), f"gp6 strip of {db}", stdin=sql)


# jsonb functions PostgreSQL 9.4 had (9.4 docs tables 9-40/9-41 plus the type's I/O, comparison,
# hash and GIN support); after the gp6 strip no other function may mention jsonb or jsonpath.
JSONB_94_FUNCTIONS = frozenset(
    {
        "jsonb_in",
        "jsonb_out",
        "jsonb_recv",
        "jsonb_send",
        "jsonb_eq",
        "jsonb_ne",
        "jsonb_lt",
        "jsonb_gt",
        "jsonb_le",
        "jsonb_ge",
        "jsonb_cmp",
        "jsonb_hash",
        "jsonb_hash_extended",
        "jsonb_contains",
        "jsonb_contained",
        "jsonb_exists",
        "jsonb_exists_any",
        "jsonb_exists_all",
        "jsonb_object_field",
        "jsonb_object_field_text",
        "jsonb_array_element",
        "jsonb_array_element_text",
        "jsonb_extract_path",
        "jsonb_extract_path_text",
        "jsonb_array_elements",
        "jsonb_array_elements_text",
        "jsonb_array_length",
        "jsonb_each",
        "jsonb_each_text",
        "jsonb_object_keys",
        "jsonb_populate_record",
        "jsonb_populate_recordset",
        "jsonb_to_record",
        "jsonb_to_recordset",
        "jsonb_typeof",
        "gin_extract_jsonb",
        "gin_extract_jsonb_query",
        "gin_consistent_jsonb",
        "gin_triconsistent_jsonb",
        "gin_extract_jsonb_path",
        "gin_extract_jsonb_query_path",
        "gin_consistent_jsonb_path",
        "gin_triconsistent_jsonb_path",
        "gin_compare_jsonb",
    }
)

# What the stripped catalog must refuse, with the error GP6 gives, and what must still work.
MUST_FAIL = (
    ("SELECT '{}'::jsonb || '{}'::jsonb", "operator does not exist: jsonb || jsonb"),
    ("SELECT jsonb_build_object('a', 1)", "function jsonb_build_object(unknown, integer)"),
    ("SELECT jsonb_build_array(1)", "function jsonb_build_array(integer) does not exist"),
    ("SELECT to_jsonb(1)", "function to_jsonb(integer) does not exist"),
    ("SELECT jsonb_agg(x) FROM generate_series(1, 2) x", "function jsonb_agg(integer)"),
    ("SELECT jsonb_object_agg('k', 1)", "function jsonb_object_agg(unknown, integer)"),
    ("SELECT jsonb_set('{}'::jsonb, '{a}', '1')", "function jsonb_set(jsonb, unknown, unknown)"),
    ("SELECT jsonb_insert('{}'::jsonb, '{a}', '1')", "function jsonb_insert("),
    ("SELECT jsonb_strip_nulls('{}'::jsonb)", "function jsonb_strip_nulls(jsonb)"),
    ("SELECT jsonb_pretty('{}'::jsonb)", "function jsonb_pretty(jsonb) does not exist"),
    ("SELECT jsonb_object('{a,b}'::text[])", "function jsonb_object(text[]) does not exist"),
    ("SELECT '{\"a\":1}'::jsonb - 'a'", "operator does not exist: jsonb - unknown"),
    ("SELECT '[1]'::jsonb - 0", "operator does not exist: jsonb - integer"),
    ("SELECT '{}'::jsonb #- '{a}'::text[]", "operator does not exist: jsonb #- text[]"),
    ("SELECT '{}'::jsonb @? '$.a'", "operator does not exist: jsonb @? unknown"),
    ("SELECT '{}'::jsonb @@ '$.a'", "operator does not exist: jsonb @@ unknown"),
    ("SELECT jsonb_path_exists('{}'::jsonb, '$.a')", "function jsonb_path_exists(jsonb, unknown)"),
    ("SELECT '$.a'::jsonpath", 'type "jsonpath" does not exist'),
    ("SELECT '1'::jsonb::int", "cannot cast type jsonb to integer"),
    ("SELECT json_strip_nulls('{}'::json)", "function json_strip_nulls(json) does not exist"),
)

MUST_WORK = (
    ("SELECT '{\"a\":1}'::jsonb ->> 'a'", "1"),
    ("SELECT '{\"a\":{\"b\":2}}'::jsonb #>> '{a,b}'", "2"),
    ('SELECT count(*)::text FROM jsonb_each(\'{"a":1,"b":2}\'::jsonb)', "2"),
    ("SELECT jsonb_typeof(json_build_object('a', 1, 'b', 'x')::jsonb)", "object"),
    ("SELECT json_object_agg(k, v)::text FROM (VALUES ('a', 1)) t(k, v)", '{ "a" : 1 }'),
    ("SELECT ('{\"a\":1}'::jsonb @> '{\"a\":1}')::text", "true"),
    ("SELECT ('{\"a\":1}'::jsonb ? 'a')::text", "true"),
    ("SELECT jsonb_array_length('[1,2,3]')::text", "3"),
    ("SELECT row_to_json(t)::jsonb ->> 'x' FROM (SELECT 5 AS x) t", "5"),
    ("SELECT to_json('x'::text)::text", '"x"'),
    ("SELECT ('{\"b\":1}'::jsonb = '{\"b\":1}'::jsonb)::text", "true"),
)
