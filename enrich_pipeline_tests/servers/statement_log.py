"""Scanning a server's statement log for syntax Greenplum 6 / AnalyticDB 6.0 rejects.

A stock PostgreSQL 12 accepts far more SQL than the target does, so on the gp6 profile every
statement the suite sent is read back from ``postgres.log`` and checked against
``FORBIDDEN_SYNTAX`` (comments, string literals and quoted identifiers aside).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Connections opened for the servers' own purposes carry this name so that the log scan can tell
# them apart from the code under test.
INTERNAL_APPLICATION_NAME = "pg_servers-internal"


@dataclass(frozen=True)
class LoggedStatement:
    pid: int
    user: str | None
    database: str | None
    application: str | None
    text: str


_PREFIX_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?: [A-Za-z0-9+\-:/_]+)? \[(?P<pid>\d+)\] "
    r"(?P<rest>.*)$",
    re.DOTALL,
)
_LEVEL_RE = re.compile(
    r"(?P<head>.*?)(?P<level>DEBUG[1-5]|LOG|INFO|NOTICE|WARNING|ERROR|FATAL|PANIC|DETAIL|HINT"
    r"|QUERY|CONTEXT|LOCATION|STATEMENT):  (?P<msg>.*)",
    re.DOTALL,
)
_SESSION_RE = re.compile(r"^(?P<user>.*?)@(?P<db>.*?) app=(?P<app>.*?) $", re.DOTALL)
# "statement: " for the simple protocol, "execute <name>: " for the extended one (psycopg 3).
_STATEMENT_RE = re.compile(r"^(?:statement|execute(?: fetch from)? [^:\n]*): ", re.DOTALL)


def _log_entries(log_path: Path) -> Iterator[tuple[int, str, str, str]]:
    """Yield (pid, session head, level, message) per log entry.

    PostgreSQL's stderr format puts a tab after every newline inside a message, so a line
    starting with a tab continues the previous entry. Only "\\n" separates lines there; a
    statement may contain a bare "\\r", hence no splitlines().
    """
    text = Path(log_path).read_bytes().decode("utf-8", errors="replace")
    current: list[str] | None = None
    pid, head, level = 0, "", ""
    for line in text.split("\n"):
        if line.startswith("\t") and current is not None:
            current.append(line[1:])
            continue
        if current is not None:
            yield pid, head, level, "\n".join(current)
            current = None
        m = _PREFIX_RE.match(line)
        if not m:
            continue  # not an elog line (e.g. a library writing to stderr)
        lm = _LEVEL_RE.match(m["rest"])
        if not lm:
            continue
        pid, head, level = int(m["pid"]), lm["head"], lm["level"]
        current = [lm["msg"]]
    if current is not None:
        yield pid, head, level, "\n".join(current)


def logged_statements(log_path: Path) -> list[LoggedStatement]:
    """Every statement in the log, in order, including repeats."""
    out: list[LoggedStatement] = []
    for pid, head, level, msg in _log_entries(log_path):
        if level != "LOG":
            continue
        sm = _STATEMENT_RE.match(msg)
        if not sm:
            continue
        session = _SESSION_RE.match(head)
        out.append(
            LoggedStatement(
                pid=pid,
                user=session["user"] if session else None,
                database=session["db"] if session else None,
                application=session["app"] if session else None,
                text=msg[sm.end() :],
            )
        )
    return out


_DOLLAR_TAG_RE = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")


def _strip_literals(sql: str, *, keep_strings: bool = False) -> str:
    """Blank out comments, quoted identifiers and (unless keep_strings) string literals.

    Without this, data such as 'a LATERAL thinking' or a column named "include" would be
    reported. Dollar-quoted bodies are scanned as code because they are almost always function
    or DO bodies, which GP6 parses when they run.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            out.append(" ")
        elif c == "/" and sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            out.append(" ")
        elif c == "'":
            prev = sql[i - 1] if i else ""
            before = sql[i - 2] if i >= 2 else ""
            backslashes = prev in "eE" and not (before.isalnum() or before in "_$")
            j = i + 1
            while j < n:
                if backslashes and sql[j] == "\\":
                    j += 2
                elif sql[j] == "'":
                    if sql.startswith("''", j):
                        j += 2
                    else:
                        break
                else:
                    j += 1
            out.append(sql[i : j + 1] if keep_strings else "''")
            i = j + 1
        elif c == '"':
            j = i + 1
            while j < n:
                if sql.startswith('""', j):
                    j += 2
                elif sql[j] == '"':
                    break
                else:
                    j += 1
            out.append('"_"')
            i = j + 1
        elif c == "$" and not (i and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            m = _DOLLAR_TAG_RE.match(sql, i)
            if m:
                end = sql.find(m.group(0), m.end())
                body = sql[m.end() : end if end >= 0 else n]
                out.append(" " + _strip_literals(body, keep_strings=keep_strings) + " ")
                i = n if end < 0 else end + len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_I = re.IGNORECASE
# Syntax PostgreSQL 9.5-12 added that Greenplum 6 / AnalyticDB 6.0 reject.
FORBIDDEN_SYNTAX: dict[str, re.Pattern[str]] = {
    "SKIP LOCKED": re.compile(r"\bSKIP\s+LOCKED\b", _I),  # 9.5
    "LATERAL": re.compile(r"\bLATERAL\b", _I),  # 9.3, but GP6's planner rejects it
    "identity column": re.compile(  # 10
        r"\bGENERATED\s+(?:ALWAYS|BY\s+DEFAULT)\s+AS\s+IDENTITY\b"
        r"|\bSET\s+GENERATED\s+(?:ALWAYS|BY\s+DEFAULT)\b|\bDROP\s+IDENTITY\b",
        _I,
    ),
    "generated column": re.compile(r"\bGENERATED\s+ALWAYS\s+AS\s*\(", _I),  # 12
    "INCLUDE (covering index)": re.compile(r"\bINCLUDE\s*\(", _I),  # 11
    "CONCURRENTLY": re.compile(r"\bCONCURRENTLY\b", _I),
    "CREATE INDEX IF NOT EXISTS": re.compile(
        r"\bCREATE\s+INDEX\b[^;]*\bIF\s+NOT\s+EXISTS\b", _I
    ),  # 9.5
}
# INCLUDE( only means a covering index in DDL; elsewhere it could be a function call.
_DDL_ONLY_RULES = frozenset({"INCLUDE (covering index)"})
_DDL_RE = re.compile(r"^\s*(?:CREATE|ALTER)\b", _I)
# Bodies of these are often single-quoted, so their strings must be scanned as code.
_ROUTINE_RE = re.compile(r"^\s*(?:DO\b|CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE)\b)", _I)


def _violations(sql: str) -> list[str]:
    code = _strip_literals(sql)
    if _ROUTINE_RE.match(code):
        code = _strip_literals(sql, keep_strings=True)
    is_ddl = bool(_DDL_RE.match(code))
    return [
        rule
        for rule, pattern in FORBIDDEN_SYNTAX.items()
        if (is_ddl or rule not in _DDL_ONLY_RULES) and pattern.search(code)
    ]


def _allowed(sql: str, allow: Sequence[str | re.Pattern[str]]) -> bool:
    for item in allow:
        if isinstance(item, re.Pattern):
            if item.search(sql):
                return True
            continue
        if item.lower() in sql.lower():
            return True
        try:
            if re.search(item, sql, _I | re.DOTALL):
                return True
        except re.error:
            pass  # it was meant as a plain substring
    return False


def forbidden_statements(
    log_path: Path,
    allow: Iterable[str | re.Pattern[str]] = (),
    *,
    ignore_applications: Iterable[str] = (INTERNAL_APPLICATION_NAME,),
) -> list[str]:
    """Logged statements that use syntax Greenplum 6 / AnalyticDB 6.0 lack (see FORBIDDEN_SYNTAX).

    ``allow`` holds substrings (case-insensitive) or regexes; a statement matching any of them is
    exempt, e.g. a documented CONCURRENTLY fallback. Only top-level statements are logged, so SQL
    built dynamically inside functions (EXECUTE) is not seen.
    """
    allow_list = list(allow)
    ignored = set(ignore_applications)
    return [
        st.text
        for st in logged_statements(log_path)
        if st.application not in ignored
        and _violations(st.text)
        and not _allowed(st.text, allow_list)
    ]
