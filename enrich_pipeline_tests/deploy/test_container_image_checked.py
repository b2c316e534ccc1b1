"""The image definition (deploy/Dockerfile) passes hadolint, installs the locked dependency set
with the `k8s` extra, runs as a non-root user, checks its own health as the chart's probe does,
and agrees with the chart values on port and user. Docker itself is not run: there is no Docker
daemon or image registry here, so the image is never built by the suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from enrich_pipeline_tests.deploy.files import DOCKERFILE, ROOT, values

HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_hadolint_passes_the_dockerfile() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_image_that_runs_as_root(tmp_path: Path) -> None:
    rooted = tmp_path / "Dockerfile"
    rooted.write_text(DOCKERFILE.read_text() + "USER root\n")
    result = hadolint(rooted)
    assert result.returncode != 0 and "DL3002" in result.stdout, result.stdout


def test_the_image_installs_the_locked_set_and_runs_as_a_non_root_user() -> None:
    steps = instructions()
    (install,) = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert '-c requirements/lock.txt ".[k8s]"' in install
    users = [args for op, args in steps if op == "USER"]
    assert users[-1] == "10001:10001"
    assert not [args for op, args in steps if op in ("ENV", "ARG") and "KEY" in args.upper()]
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    assert re.search(r"^dagster-k8s==0\.29\.27$", lock, re.MULTILINE)
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line for line in lines if line and not line.startswith("#")]
    assert ignored[:1] == ["*"] and "!requirements/lock.txt" in ignored


def test_the_image_and_the_chart_agree() -> None:
    steps = dict(instructions())
    assert steps["HEALTHCHECK"].endswith(
        'CMD ["dagster", "api", "grpc-health-check", "-p", "3030"]'
    )
    assert steps["EXPOSE"] == "3030"
    (deployment,) = values()["dagster-user-deployments"]["deployments"]
    assert deployment["port"] == 3030
    assert deployment["podSecurityContext"]["runAsUser"] == 10001
    assert values()["dagsterDaemon"]["podSecurityContext"]["runAsUser"] == 10001
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in steps["ENV"]
