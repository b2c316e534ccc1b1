"""End to end: the real Dagster webserver and daemon, the sensor launching runs, and the UI.

One module-scoped stack runs the project's launcher (``python -m enrich_pipeline.cli.dagster``,
the
``enrich-dagster`` command: ``dagster dev`` with the repo's dagster.yaml in a temporary
DAGSTER_HOME and run storage in a fresh database of the test PostgreSQL) against a namespace
seeded with pending rows for two users and the stand-in DashScope server. Nobody clicks: the
sensor (default status RUNNING) must add the partitions and launch one run per user.

The browser tests drive Debian's Chromium (``/usr/bin/chromium``) with Playwright
(``e2e/browser.py``) and never download a browser; CI installs the package (see ``.ci/run``).
They look at what a person sees: each user's partition and statistics, the launchpad, a run's
tags, the Checks tab's "Execute all", the whole table's ``items_table`` (row count, plots), and a
partition whose rows all failed (red). Every page they check is saved as
``artifacts/e2e_ui_*.png``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from PIL import Image
from psycopg import sql

from enrich_pipeline.defs.heartbeat import liveness_of
from enrich_pipeline_tests.e2e.browser import (
    UI_TIMEOUT_MS,
    Screenshots,
    dagster_page,
    dot_colour,
    metadata_row,
    partition_dot,
    shown,
)
from enrich_pipeline_tests.helpers import API_KEY, Items, deployment_env, free_port, hues
from enrich_pipeline_tests.standin import StandIn

ASSET = "enriched_items"
JOB = "enrich_job"
SENSOR = "pending_rows_sensor"
# Each user's pending rows, by image color (conftest's image_dir).
SEED = {"alice": ["blue", "red", "green"], "bob": ["yellow", "cyan"]}
# Deadlines, not expectations: a Dagster start can take minutes on a busy machine.
STARTUP_TIMEOUT = 300.0
RUNS_TIMEOUT = 120.0
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@dataclass
class Stack:
    """The running servers, where they write, and what the test seeded."""

    url: str
    home: Path
    proc: subprocess.Popen
    logs: list[Path]
    items: Items
    instance: DagsterInstance
    standin: StandIn
    seeded: dict[str, list[str]]  # user -> ids of the pending rows
    untouched: dict[str, dict[str, Any]]  # id -> row as seeded (must not change)
    env: dict[str, str] = field(default_factory=dict)  # the servers' environment
    started: float = field(default_factory=time.monotonic)
    runs_done_after: float | None = None

    def output(self) -> str:
        return "\n".join(
            f"===== {p.name} =====\n{p.read_text(errors='replace')}"
            for p in self.logs
            if p.exists()
        )

    def mark(self) -> list[int]:
        """Where the servers' logs end now (see ``output_since``)."""
        return [p.stat().st_size if p.exists() else 0 for p in self.logs]

    def output_since(self, mark: list[int]) -> str:
        """What the servers wrote after ``mark``."""
        parts = []
        for path, offset in zip(self.logs, mark, strict=True):
            with path.open("rb") as f:
                f.seek(offset)
                parts.append(f.read().decode(errors="replace"))
        return "\n".join(parts)

    def print_output(self) -> None:
        print(self.output()[-60_000:], flush=True)

    def runs(self) -> list:
        return self.instance.get_runs(filters=RunsFilter(job_name=JOB))

    def wait_for_runs(self, timeout: float = RUNS_TIMEOUT) -> list:
        """Both users' runs succeeded (launched by the sensor, nobody clicked); fail fast."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs()
            done = {
                r.tags.get("dagster/partition")
                for r in runs
                if r.status == DagsterRunStatus.SUCCESS
            }
            if done >= set(SEED):
                if self.runs_done_after is None:
                    self.runs_done_after = time.monotonic() - self.started
                return runs
            bad = [r for r in runs if r.status in TERMINAL - {DagsterRunStatus.SUCCESS}]
            if bad:
                raise AssertionError(f"run(s) did not succeed:\n{self._run_errors(bad)}")
            if self.proc.poll() is not None:
                raise AssertionError(f"the launcher exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no successful run for every user after {timeout:.0f} s: "
                    + ", ".join(f"{r.tags.get('dagster/partition')}={r.status.value}" for r in runs)
                )
            time.sleep(0.5)

    def _run_errors(self, runs: list) -> str:
        lines = []
        for run in runs:
            lines.append(f"run {run.run_id} ({run.tags.get('dagster/partition')}): {run.status}")
            for event in self.instance.all_logs(run.run_id):
                if event.is_dagster_event and event.dagster_event.event_type in (
                    DagsterEventType.STEP_FAILURE,
                    DagsterEventType.RUN_FAILURE,
                ):
                    lines.append(f"  {event.dagster_event.message}")
                    failure = event.dagster_event.event_specific_data
                    if getattr(failure, "error", None) is not None:
                        lines.append(f"    {failure.error.to_string().strip()}")
        return "\n".join(lines)


@contextmanager
def _dump_output_on_failure(stack: Stack) -> Iterator[None]:
    try:
        yield
    except BaseException:
        stack.print_output()
        raise


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False once nobody is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the launcher's whole process group: dagster dev, webserver, daemon, code servers
    and run workers (none of them starts a session of its own). SIGTERM first, so that
    ``dagster dev`` shuts its services down, then SIGKILL whatever is left."""
    pgid = proc.pid  # start_new_session: the launcher leads its own group
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the launcher, or its zombie keeps the group "alive"
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.2)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait(timeout=5)


def _drop_database(conninfo: str, dbname: str) -> None:
    ident = sql.Identifier(dbname)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        except psycopg.errors.SyntaxError:  # servers older than PostgreSQL 13
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))


@pytest.fixture(scope="module")
def stack(
    pg_conninfo: str,
    _standin_server: StandIn,
    image_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    # The ``items``/``env`` fixtures are per test; the servers live for the module, so the same
    # namespace and environment are built here once.
    standin = _standin_server
    standin.clear_faults()
    standin.reset_log()
    standin.latency = 0.0
    standin.rpm_limit = None
    namespace = f"t_{uuid.uuid4().hex[:10]}"
    items = Items(pg_conninfo, namespace)
    seeded = {
        user: [
            items.add(user, str(image_dir / f"{c}.jpg"), metadata={"sku": f"{user}-{n}"})
            for n, c in enumerate(colors)
        ]
        for user, colors in SEED.items()
    }
    untouched_ids = [
        items.add("carol", str(image_dir / "red.jpg"), metadata={"caption": "written by hand"}),
        items.add("dave", str(image_dir / "blue.jpg"), status="archived"),
        items.add("erin", None),
    ]
    untouched = {i: items.row(i) for i in untouched_ids}

    tmp = tmp_path_factory.mktemp("e2e")
    dbname = f"dagster_{uuid.uuid4().hex[:10]}"
    env = deployment_env(
        items,
        standin,
        pg_conninfo,
        tmp / "dagster_home",
        dbname,
        # The items_table sensor catches up within seconds where a run left the table to it.
        ENRICH_OVERVIEW_INTERVAL="5",
        # The stand-in's host has no list prices: a price list of our own, so that the table's
        # spend to date is a figure with its currency (made-up prices, per million tokens).
        ENRICH_PRICES=json.dumps(
            {"qwen3-vl-plus": [2.0, 8.0], "text-embedding-v4": [0.5, 0.0], "currency": "USD"}
        ),
    )
    home = Path(env["DAGSTER_HOME"])
    port = free_port()
    logs = [tmp / "servers.stdout.log", tmp / "servers.stderr.log"]
    with logs[0].open("wb") as out, logs[1].open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "enrich_pipeline.cli.dagster", "--host", "127.0.0.1"]
            + ["--port", str(port)],
            env=env,
            cwd=str(tmp),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, killed whole at teardown
        )
    instance = None
    mp = pytest.MonkeyPatch()
    try:
        # The test process reads the same instance (dagster.yaml takes its values from env).
        for name in ("DAGSTER_HOME", "DAGSTER_PG_URL", "ENRICH_MAX_CONCURRENT_RUNS"):
            mp.setenv(name, env[name])
        instance = DagsterInstance.from_config(str(home))
        stack = Stack(
            url=f"http://127.0.0.1:{port}",
            home=home,
            proc=proc,
            logs=logs,
            items=items,
            instance=instance,
            standin=standin,
            seeded=seeded,
            untouched=untouched,
            env=env,
        )
        _wait_for_webserver(stack)
        yield stack
    finally:
        try:
            _stop(proc)
        finally:
            if instance is not None:
                instance.dispose()
            mp.undo()
            try:
                _drop_database(pg_conninfo, dbname)
            finally:
                with psycopg.connect(pg_conninfo, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            sql.Identifier(namespace)
                        )
                    )


def _wait_for_webserver(stack: Stack) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if stack.proc.poll() is not None:
            stack.print_output()
            pytest.fail(f"enrich-dagster exited with {stack.proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{stack.url}/server_info", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            stack.print_output()
            pytest.fail(f"the Dagster webserver did not answer within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(0.5)


def test_sensor_runs_every_user_without_a_click(stack: Stack) -> None:
    with _dump_output_on_failure(stack):
        stack.wait_for_runs()
        print(f"both runs succeeded {stack.runs_done_after:.1f} s after the launcher started")

        # The database: every seeded row enriched, its own keys kept; the others untouched.
        for user, ids in stack.seeded.items():
            for n, item_id in enumerate(ids):
                row = stack.items.row(item_id)
                md = row["metadata"]
                assert row["user_id"] == user
                assert md["sku"] == f"{user}-{n}", md
                assert md["caption"].strip(), md
                assert md["dominant_colors"] and isinstance(md["dominant_colors"], list), md
                assert isinstance(md["style_tags"], list) and isinstance(md["object_tags"], list)
                assert md["caption_generated_at"], md
        for item_id, before in stack.untouched.items():
            assert stack.items.row(item_id) == before
        # One caption call per pending row, none for the others.
        n_rows = sum(len(ids) for ids in stack.seeded.values())
        assert stack.standin.count("chat", status=200) == n_rows
        assert stack.standin.count("chat") == n_rows

        # The run records: one successful sensor run per user partition, nothing else.
        runs = stack.runs()
        assert len(runs) == len(SEED), [(r.tags, r.status) for r in runs]
        by_user = {r.tags["dagster/partition"]: r for r in runs}
        assert set(by_user) == set(SEED)
        for run in runs:
            assert run.status == DagsterRunStatus.SUCCESS
            assert run.tags.get("dagster/sensor_name") == SENSOR, run.tags
            assert run.tags.get("dagster/run_key", "").startswith(
                run.tags["dagster/partition"] + "|"
            )
        assert sorted(stack.instance.get_dynamic_partitions("users")) == sorted(SEED)

        # The materializations: one per partition, with the run's statistics.
        records = stack.instance.fetch_materializations(AssetKey(ASSET), limit=100).records
        assert len(records) == len(SEED)
        for record in records:
            mat = record.asset_materialization
            assert mat is not None
            user = mat.partition
            assert record.run_id == by_user[user].run_id
            md = {k: v.value for k, v in mat.metadata.items()}
            n = len(SEED[user])
            assert (md["total"], md["succeeded"], md["failed"], md["skipped"]) == (n, n, 0, 0)
            assert md["success_rate"] == pytest.approx(1.0)
            assert md["tokens_used"] > 0 and md["provider"] == "dashscope"
            # The user's own figures; the table's row count is items_table's, not a user's.
            assert md["items_captioned"] == n and "dagster/row_count" not in md
            assert md["items_pending"] == 0 and "path" not in md

        # The secret: not in the servers' output, the run logs, or anything in DAGSTER_HOME.
        output = stack.output()
        # The capture works: the launcher's line, and the run workers' own lines; but their
        # DEBUG step events are not echoed, and Dagster's beta warning about `owners` is gone.
        assert "Dagster UI on http://127.0.0.1:" in output
        for run in runs:
            lines = [line for line in output.splitlines() if run.run_id in line]
            assert any("chunk 0 written" in line for line in lines), lines
            assert not any(" - DEBUG - " in line for line in lines), lines[:5]
        assert "BetaWarning" not in output and "owners" not in output
        assert API_KEY not in output
        for run in runs:
            assert API_KEY not in json.dumps(run.run_config, default=str)
            assert API_KEY not in json.dumps(run.tags)
            for event in stack.instance.all_logs(run.run_id):
                assert API_KEY not in (event.user_message or "")
        for path in stack.home.rglob("*"):
            if path.is_file():
                assert API_KEY.encode() not in path.read_bytes(), path


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def test_ui_shows_user_partitions_and_latest_statistics(stack: Stack, tmp_path: Path) -> None:
    shots = Screenshots(tmp_path)
    with _dump_output_on_failure(stack):
        stack.wait_for_runs()
        records = stack.instance.fetch_materializations(AssetKey(ASSET), limit=100).records
        expected = {
            r.asset_materialization.partition: {
                k: v.value for k, v in r.asset_materialization.metadata.items()
            }
            for r in records
        }
        assert set(expected) == set(SEED)
        latest = records[0].asset_materialization.partition  # newest first
        with dagster_page(shots, "statistics") as page:
            expect = _expect()

            def expect_statistics(user: str) -> None:
                md = expected[user]
                expect(metadata_row(page, "user_id")).to_have_text(user, timeout=UI_TIMEOUT_MS)
                for key in ("total", "succeeded", "failed", "success_rate", "tokens_used"):
                    expect(metadata_row(page, key)).to_have_text(shown(md[key]))
                assert md["succeeded"] == len(SEED[user]) and md["tokens_used"] > 0

            # The partitions tab: one dynamic partition per user, both materialized.
            page.goto(f"{stack.url}/assets/{ASSET}?view=partitions")
            expect(page.get_by_text("Materialized (2)")).to_be_visible(timeout=UI_TIMEOUT_MS)
            for user in SEED:
                expect(page.get_by_title(user, exact=True)).to_be_visible()
            shots(page, "partitions")

            # Each partition's latest materialization, reached by clicking it in the list.
            for user in SEED:
                page.get_by_title(user, exact=True).click()
                expect(page).to_have_url(re.compile(rf"partition={user}\b"))
                expect(page.get_by_text("Latest materialization")).to_be_visible()
                expect_statistics(user)
                shots(page, f"partition_{user}")

            # The overview: the asset's latest materialization and its statistics.
            page.goto(f"{stack.url}/assets/{ASSET}")
            expect(page.get_by_text("Latest materialization")).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.get_by_role("link", name=SENSOR)).to_be_visible()
            expect_statistics(latest)
            shots(page, "overview")

            # The launchpad is usable without the README: the job says what it does, and
            # on an emptied editor "Scaffold all default config" fills in every default.
            page.goto(f"{stack.url}/locations/enrich_pipeline/jobs/{JOB}/playground")
            editor = page.locator(".CodeMirror").first
            expect(editor).to_contain_text("batch_size", timeout=UI_TIMEOUT_MS)
            editor.click()
            page.keyboard.press("Control+A")
            page.keyboard.press("Delete")
            scaffold = page.get_by_role("button", name="Scaffold all default config")
            expect(scaffold).to_be_enabled(timeout=UI_TIMEOUT_MS)
            scaffold.click()
            page.get_by_role("button", name="Confirm").click()
            for default in ("batch_size: 100", "max_attempts: 3", "overlap:"):
                expect(editor).to_contain_text(default)
            shots(page, "launchpad")

            # A finished run's tags, as the UI lists them: its user, and no liveness
            # bookkeeping (kept under Dagster's hidden ".dagster/" prefix).
            run = next(r for r in stack.runs() if r.tags.get("dagster/partition") == latest)
            page.goto(f"{stack.url}/runs/{run.run_id}")
            page.get_by_role("button", name="View tags and config").click()
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text(f"enrich/user: {latest}", timeout=UI_TIMEOUT_MS)
            for hidden in ("heartbeat", "worker", ".dagster"):
                expect(dialog).not_to_contain_text(hidden)
            shots(page, "run_tags")
            page.keyboard.press("Escape")
            page.goto(f"{stack.url}/locations/enrich_pipeline/jobs/{JOB}")
            expect(page.get_by_text("write each chunk back as it completes").first).to_be_visible(
                timeout=UI_TIMEOUT_MS
            )

        # Still one run per user: the sensor did not request the same work twice.
        assert len(stack.runs()) == len(SEED)


CHECKS = ("embedding_dimensions", "failure_share", "no_unrecorded_pending_rows")


def _wait_for_run(stack: Stack, run_id: str, timeout: float = RUNS_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = stack.instance.get_run_by_id(run_id)
        if run is not None and run.status in TERMINAL:
            return run
        assert time.monotonic() < deadline, f"run {run_id} not finished: {run and run.status}"
        time.sleep(0.5)


def _check_evaluations(stack: Stack, run_id: str) -> list[Any]:
    return [
        e.dagster_event.event_specific_data
        for e in stack.instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
    ]


def test_execute_all_on_the_checks_tab_evaluates_every_user(stack: Stack, tmp_path: Path) -> None:
    """The Checks tab's "Execute all" launches a run with no partition: every check evaluates
    every user partition (and the asset as a whole), each evaluation linked to the partition's
    materialization; the run succeeds and the server log holds no traceback."""
    shots = Screenshots(tmp_path)
    with _dump_output_on_failure(stack):
        stack.wait_for_runs()
        users = sorted(stack.instance.get_dynamic_partitions("users"))
        mark = stack.mark()
        with dagster_page(shots, "checks") as page:
            expect = _expect()
            page.goto(f"{stack.url}/assets/{ASSET}?view=checks")
            expect(page.get_by_text(f"Checks ({len(CHECKS)})")).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.get_by_role("button", name="Execute all").click()
            launched = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
            expect(launched).to_be_visible(timeout=UI_TIMEOUT_MS)
            prefix = re.search(r"[0-9a-f]{8}", launched.inner_text()).group(0)
            (run_id,) = [r.run_id for r in stack.instance.get_runs() if r.run_id.startswith(prefix)]
            run = _wait_for_run(stack, run_id)
            if run.status != DagsterRunStatus.SUCCESS:
                raise AssertionError(stack._run_errors([run]))

            # What the run recorded, for every check: one evaluation of the whole asset that
            # judged every user partition and passed, linked to the asset's latest
            # materialization; the users it recorded one by one (those whose result or target
            # changed) passed and are linked to their own.
            evaluations = _check_evaluations(stack, run_id)
            for check in CHECKS:
                mine = [e for e in evaluations if e.check_name == check]
                (whole,) = [e for e in mine if e.partition is None]
                assert whole.passed, whole
                assert whole.metadata["partitions_evaluated"].value == len(users), whole
                assert whole.target_materialization_data is not None
                for e in mine:
                    assert e.passed and e.target_materialization_data is not None, e
                    assert e.partition is None or e.partition in users, e

            # What a person sees, for each check: this run's row in the execution history,
            # passed, "all N user partition(s) pass"; every user passed in its Partitions view;
            # "Execution failed" nowhere.
            for check in CHECKS:
                page.goto(f"{stack.url}/assets/{ASSET}?view=checks&checkDetail={check}")
                page.get_by_text("Execution history", exact=True).click()
                row = (
                    page.locator("tr")
                    .filter(has=page.locator(f"a[href*='{run_id}']"))
                    .filter(has=page.locator("td", has_text=re.compile(r"^\s*-\s*$")))
                )
                expect(row.first).to_contain_text("Passed", timeout=UI_TIMEOUT_MS)
                expect(row.first).to_contain_text(f"all {len(users)} user partition(s) pass")
                expect(page.get_by_text("Execution failed")).to_have_count(0)
                shots(page, f"checks_execute_all_{check}_history")
                page.get_by_text("Partitions", exact=True).last.click()
                expect(page.get_by_text(f"Passed ({len(users)})")).to_be_visible(
                    timeout=UI_TIMEOUT_MS
                )
                expect(page.get_by_text("Execution Failed (0)")).to_be_visible()
                for user in users:
                    expect(page.get_by_title(user, exact=True).first).to_be_visible()
                shots(page, f"checks_execute_all_{check}_partitions")
            # The list beside agrees: every check succeeded.
            expect(page.get_by_text("Succeeded", exact=True)).to_have_count(len(CHECKS))
        log = stack.output_since(mark)
        assert "Traceback" not in log and "non-partitioned run" not in log, log[-5000:]


TABLE = "items_table"


def _table_counts(stack: Stack) -> tuple[int, int]:
    """Straight from the database: the table's active rows with an image, and how many of them
    have a caption (the figures items_table must show, whatever user ran last)."""
    with psycopg.connect(stack.items.conninfo) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE metadata ? 'caption') FROM {}"
                " WHERE status = 'active' AND image IS NOT NULL"
            ).format(stack.items.ident)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_items_table_shows_the_whole_table_after_runs_for_two_users(
    stack: Stack, tmp_path: Path
) -> None:
    """After one run per user the table-wide asset describes every user's rows: its row count
    is the table's, never the last user's, and its figures over time only grow."""
    shots = Screenshots(tmp_path)
    with _dump_output_on_failure(stack):
        stack.wait_for_runs()
        items, captioned = _table_counts(stack)
        assert items not in {len(ids) for ids in stack.seeded.values()}  # a table, not a user
        # Observed at the end of each run, or by the items_table sensor soon after.
        deadline = time.monotonic() + RUNS_TIMEOUT
        while True:
            records = stack.instance.fetch_observations(AssetKey(TABLE), limit=100).records
            observed = [
                {k: v.value for k, v in r.asset_observation.metadata.items()}
                for r in reversed(records)  # oldest first
            ]
            if observed and observed[-1]["items_captioned"] == captioned:
                break
            assert time.monotonic() < deadline, observed[-1:]
            time.sleep(0.5)
        # More than one: a line over time, not a point.
        assert len(observed) >= 2, observed
        assert all(md["dagster/row_count"] == md["items"] == items for md in observed)
        progress = [md["items_captioned"] for md in observed]
        assert progress == sorted(progress) and progress[-1] == captioned, progress
        latest = observed[-1]
        assert latest["items_pending"] == 0 and latest["coverage"] == pytest.approx(1.0)
        assert latest["spend_currency"] == "USD" and latest["spend_to_date"] > 0, latest

        with dagster_page(shots, "items_table") as page:
            expect = _expect()
            # The table-wide asset's overview: the table's row count and figures.
            page.goto(f"{stack.url}/assets/{TABLE}")
            expect(page.get_by_text("Row count")).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.get_by_text(f"{items:,}", exact=True).first).to_be_visible()
            for key in ("items_captioned", "items_pending", "coverage", "spend_to_date"):
                expect(metadata_row(page, key)).to_have_text(shown(latest[key]))
            expect(metadata_row(page, "spend_currency")).to_have_text("USD")
            shots(page, "items_table_overview")

            # Its plots (the metadata's "Plots" view): the table's progress over time.
            page.get_by_role("button", name="Plots").click()
            for key in ("items_captioned", "coverage", "spend_to_date"):
                expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.locator("canvas").first).to_be_visible()
            shots(page, "items_table_plots")

            # The partitioned asset's overview no longer shows one user's rows as the table's.
            page.goto(f"{stack.url}/assets/{ASSET}")
            expect(page.get_by_text("Latest materialization")).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(metadata_row(page, "items_captioned")).to_be_visible()
            expect(page.get_by_text("Row count")).to_have_count(0)


def test_backfill_from_the_command_line_runs_one_run_per_user(stack: Stack) -> None:
    """``enrich-dagster backfill --users``: partitions added, one backfill, one run per user.

    The sensor may see the new rows too; the queue's one-run-per-partition limit and the
    claims keep them from being captioned twice, whoever gets there first.
    """
    stack.wait_for_runs()
    new = {
        "frank": [stack.items.add("frank", str(p)) for p in _images(stack, ["green", "blue"])],
        "gina": [stack.items.add("gina", str(p)) for p in _images(stack, ["red"])],
    }
    calls_before = stack.standin.count("chat")
    with _dump_output_on_failure(stack):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "enrich_pipeline.cli.dagster",
                "backfill",
                "--users",
                "frank, gina",  # trimmed: no partition " gina"
            ],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Backfilling 2 user partition(s): frank, gina" in done.stdout
        backfills = stack.instance.get_backfills()
        assert backfills, "no backfill recorded"
        backfill_id = backfills[0].backfill_id
        deadline = time.monotonic() + RUNS_TIMEOUT
        while True:
            runs = stack.instance.get_runs(
                filters=RunsFilter(job_name=JOB, tags={"dagster/backfill": backfill_id})
            )
            finished = {r.tags.get("dagster/partition"): r.status for r in runs}
            if set(finished) == set(new) and set(finished.values()) <= TERMINAL:
                break
            assert time.monotonic() < deadline, f"backfill runs not done: {finished}"
            time.sleep(0.5)
        assert set(finished.values()) == {DagsterRunStatus.SUCCESS}
    for ids in new.values():
        for item in ids:
            assert stack.items.row(item)["metadata"]["caption"]
    # Each new image paid once (the images are cached from earlier runs, so maybe not at all).
    assert stack.standin.count("chat") - calls_before <= 3


def _images(stack: Stack, colors: list[str]) -> list[str]:
    first = stack.items.row(stack.seeded["alice"][0])["image"]
    folder = Path(first).parent
    return [str(folder / f"{c}.jpg") for c in colors]


def _graphql(stack: Stack, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{stack.url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = json.loads(resp.read())
    assert "errors" not in answer, answer
    return answer["data"]


def _launcher(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enrich_pipeline.cli.dagster", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _user_runs(stack: Stack, key: str) -> list:
    """Every run (any job) that covered partition ``key``."""
    from enrich_pipeline.defs.runs import PartitionOrder, run_keys

    order = PartitionOrder.of(stack.instance)
    return [r for r in stack.instance.get_runs() if key in run_keys(r.tags, order)]


def _wait_all_captioned(stack: Stack, ids: list[str], timeout: float = RUNS_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = [i for i in ids if not stack.items.row(i)["metadata"].get("caption")]
        if not left:
            return
        assert time.monotonic() < deadline, f"rows still without a caption: {left}"
        time.sleep(0.5)


def test_backfill_refuses_unknown_users_and_typo_partitions_can_be_removed(stack: Stack) -> None:
    stack.wait_for_runs()
    with _dump_output_on_failure(stack):
        before = set(stack.instance.get_dynamic_partitions("users"))
        refused = _launcher(stack, "backfill", "--users", " alice ,, nobdy")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "'nobdy'" in refused.stderr and "no partition added" in refused.stderr
        assert set(stack.instance.get_dynamic_partitions("users")) == before
        # Asked for explicitly, an unknown user gets its partition; it is listed as such and
        # can be removed again (a user with rows cannot, unless forced).
        added = _launcher(stack, "backfill", "--users", "nobdy", "--allow-unknown")
        assert added.returncode == 0, added.stdout + added.stderr
        assert "nobdy" in stack.instance.get_dynamic_partitions("users")
        listed = _launcher(stack, "partitions")
        assert "nobdy   (no row has this user id)" in listed.stdout, listed.stdout
        kept = _launcher(stack, "partitions", "--remove", "alice")
        assert kept.returncode == 2 and "have rows" in kept.stderr
        removed = _launcher(stack, "partitions", "--remove", "nobdy")
        assert removed.returncode == 0, removed.stderr
        assert set(stack.instance.get_dynamic_partitions("users")) == before


LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""


def test_a_ui_backfill_while_the_sensor_is_on_never_runs_a_user_twice_at_once(
    stack: Stack,
) -> None:
    """A backfill launched from the UI (``__ASSET_JOB``, partition range tags, no
    ``dagster/partition``) while the sensor, on, sees the same user's new rows. Whoever gets
    there first, the user's runs never overlap, each row is captioned once, and the last
    materialization states every row captioned."""
    stack.wait_for_runs()
    user = "hana"
    stack.instance.add_dynamic_partitions("users", [user])
    calls_before = stack.standin.count("chat")
    stack.standin.latency = 0.5  # runs long enough to overlap, were they allowed to
    try:
        folder = Path(stack.items.row(stack.seeded["alice"][0])["image"]).parent
        paths = []
        for n, rgb in enumerate(hues(6)):
            path = folder / f"hana_{n}.png"
            Image.new("RGB", (40, 30), rgb).save(path)
            paths.append(path)
        ids = [stack.items.add(user, str(p)) for p in paths]
        with _dump_output_on_failure(stack):
            answer = _graphql(
                stack,
                LAUNCH_BACKFILL,
                {
                    "params": {
                        "assetSelection": [{"path": [ASSET]}],
                        "partitionNames": [user],
                        "fromFailure": False,
                    }
                },
            )
            launched = answer["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
            _wait_all_captioned(stack, ids)
            deadline = time.monotonic() + RUNS_TIMEOUT
            while True:
                runs = _user_runs(stack, user)
                if runs and all(r.status in TERMINAL for r in runs):
                    break
                assert time.monotonic() < deadline, [(r.job_name, r.status) for r in runs]
                time.sleep(0.5)
            # The UI backfill's run: the asset job, with range tags only, tagged with its user.
            ui_runs = [r for r in runs if r.tags.get("dagster/backfill") == launched["backfillId"]]
            assert ui_runs and ui_runs[0].job_name == "__ASSET_JOB"
            assert "dagster/partition" not in ui_runs[0].tags
            assert ui_runs[0].tags.get("enrich/user") == user
            # Never two at once.
            spans = sorted(
                (rec.start_time, rec.end_time)
                for rec in stack.instance.get_run_records()
                if rec.dagster_run.run_id in {r.run_id for r in runs} and rec.start_time
            )
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert end is not None and end <= start, spans
            assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
    finally:
        stack.standin.latency = 0.0
    assert stack.standin.count("chat") - calls_before == len(ids)
    records = stack.instance.fetch_materializations(AssetKey(ASSET), limit=100).records
    mine = [r.asset_materialization for r in records if r.asset_materialization.partition == user]
    latest = {k: v.value for k, v in mine[0].metadata.items()}
    assert latest["items_captioned"] == len(ids) and "dagster/row_count" not in latest
    assert latest["items_pending"] == 0
    # Every materialization's own figures add up: what it did is what it says (a run that
    # found nothing pending carries no run counters).
    assert sum(m.metadata["succeeded"].value for m in mine if "succeeded" in m.metadata) == len(ids)


def test_a_killed_run_is_failed_and_the_users_next_rows_are_captioned(stack: Stack) -> None:
    """``kill -9`` of a run's process while the code server that launched it
    cannot report it. (Dagster 1.13's code server reports a run worker it sees die; when it is
    gone too, as after an OOM kill of the machine's processes or a restart, nobody does, and
    without run monitoring the run would stay STARTED forever with its user's next run queued
    behind it.) The code server is
    paused (SIGSTOP) while its run worker is killed, and resumed after. Run monitoring, through
    the heartbeat launcher's health check, fails the run within a poll; the queue lets the
    user's next run out, and the user's rows, the dead run's and the new ones, are
    captioned."""
    stack.wait_for_runs()
    user = "ivan"
    folder = Path(stack.items.row(stack.seeded["alice"][0])["image"]).parent
    paths = []
    for n, rgb in enumerate(hues(9)):
        path = folder / f"ivan_{n}.png"
        Image.new("RGB", (44, 33), rgb).save(path)
        paths.append(path)
    stack.standin.latency = 5.0  # the run is surely in its captions when it is killed
    try:
        with _dump_output_on_failure(stack):
            first = [stack.items.add(user, str(p)) for p in paths[:4]]
            deadline = time.monotonic() + RUNS_TIMEOUT
            while True:  # the sensor's run for ivan, beating
                runs = [r for r in _user_runs(stack, user) if r.status == DagsterRunStatus.STARTED]
                if runs and liveness_of(runs[0].run_id, runs[0].tags) is not None:
                    break
                assert time.monotonic() < deadline, "no run for ivan started"
                time.sleep(0.3)
            (run,) = runs
            live = liveness_of(run.run_id, run.tags)
            assert live is not None and live.pid is not None
            worker = psutil.Process(live.pid)
            parent = worker.parent()
            assert parent is not None and "grpc" in " ".join(parent.cmdline()), parent
            parent.suspend()
            try:
                worker.kill()
                killed_at = time.monotonic()
                # New rows for ivan: his next run can only start once the dead one is failed.
                later = [stack.items.add(user, str(p)) for p in paths[4:]]
                while True:
                    status = stack.instance.get_run_by_id(run.run_id).status
                    if status in TERMINAL:
                        break
                    assert time.monotonic() - killed_at < 90, f"killed run still {status}"
                    time.sleep(0.5)
            finally:
                parent.resume()
            stack.standin.latency = 0.0
            failed_after = time.monotonic() - killed_at
            assert status == DagsterRunStatus.FAILURE
            print(f"killed run failed by run monitoring {failed_after:.1f} s after kill -9")
            assert failed_after < 45  # one poll of run monitoring (20 s), and some
            _wait_all_captioned(stack, first + later, timeout=150)
    finally:
        stack.standin.latency = 0.0
    events = stack.instance.all_logs(run.run_id)
    assert any("is gone or has not sent a heartbeat" in (e.message or "") for e in events)


def test_a_user_whose_rows_all_failed_is_not_green_in_the_partitions_view(
    stack: Stack, tmp_path: Path
) -> None:
    """A user whose every row fails (images that are not images: given up at once, no call
    paid) gets no materialization; the run fails naming the user, and the asset's Partitions
    view shows the partition as failed (red), the others still materialized (green).

    Last in the module: the failed user stays failed for the stack's life."""
    shots = Screenshots(tmp_path)
    stack.wait_for_runs()
    user = "lena"
    broken = str(Path(stack.items.row(stack.seeded["alice"][0])["image"]).parent / "broken.jpg")
    calls_before = stack.standin.count("chat")
    with _dump_output_on_failure(stack):
        ids = [stack.items.add(user, broken) for _ in range(2)]
        deadline = time.monotonic() + RUNS_TIMEOUT
        while True:  # the sensor's run for lena, to its end
            runs = _user_runs(stack, user)
            if runs and all(r.status in TERMINAL for r in runs):
                break
            assert time.monotonic() < deadline, [(r.run_id, r.status) for r in runs]
            time.sleep(0.5)
        (run,) = runs
        assert run.status == DagsterRunStatus.FAILURE, run.status
        # One line naming the user, in the run's failure.
        errors = stack._run_errors([run])
        assert f"'{user}'" in errors or f" {user}" in errors, errors
        # The database: both rows given up, neither captioned, nothing paid for.
        for item in ids:
            assert "caption" not in (stack.items.row(item)["metadata"] or {})
        assert stack.standin.count("chat") == calls_before
        # Dagster: no materialization for the user; the others' are kept.
        records = stack.instance.fetch_materializations(AssetKey(ASSET), limit=1000).records
        materialized = {r.asset_materialization.partition for r in records}
        assert user not in materialized and set(SEED) <= materialized
        # Its checks are still evaluated in that run: failure_share fails for the user.
        (share,) = [
            e
            for e in _check_evaluations(stack, run.run_id)
            if e.check_name == "failure_share" and e.partition == user
        ]
        assert not share.passed, share

        with dagster_page(shots, "failed_partition") as page:
            expect = _expect()
            page.goto(f"{stack.url}/assets/{ASSET}?view=partitions")
            expect(page.get_by_text("Failed (1)")).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.get_by_title(user, exact=True)).to_be_visible()
            assert "red" in dot_colour(partition_dot(page, user))
            for other in SEED:
                assert "green" in dot_colour(partition_dot(page, other))
            shots(page, "failed_partition")
            # Its detail says why it is red.
            page.get_by_title(user, exact=True).click()
            expect(page).to_have_url(re.compile(rf"partition={user}\b"))
            expect(
                page.get_by_text(f"Run {run.run_id[:8]} failed, and did not materialize this asset")
            ).to_be_visible(timeout=UI_TIMEOUT_MS)
            shots(page, "failed_partition_detail")
            # The run's page: the one line that names the user and why.
            page.goto(f"{stack.url}/runs/{run.run_id}")
            expect(page.get_by_text(re.compile(rf"user '{user}': every row")).first).to_be_visible(
                timeout=UI_TIMEOUT_MS
            )
            shots(page, "failed_partition_run")
            # A partition an asset-page backfill materialized (hana, earlier in the module):
            # its latest materialization links its run. (Where that run is the backfill's,
            # Dagster's UI shows "Job None": it names no job for its hidden __ASSET_JOB.)
            hana = [r.run_id for r in records if r.asset_materialization.partition == "hana"]
            if hana:
                page.goto(f"{stack.url}/assets/{ASSET}?view=partitions&partition=hana")
                expect(metadata_row(page, "user_id")).to_have_text("hana", timeout=UI_TIMEOUT_MS)
                expect(page.get_by_role("link", name=hana[0][:8]).first).to_be_visible()
                shots(page, "backfilled_partition")
