"""The sensor's record of requested pending sets (``Seen``) at 100,000 users: it tells the
users whose rows changed from those it already requested, keeps only users still pending, and
survives the cursor's round trip. (Its speed at that size is the benchmark's to show:
``python -m benchmarks.scale``.)"""

from __future__ import annotations

from enrich_pipeline.defs.sensors import Seen

USERS = 100_000


def fingerprints(changed: range = range(0), gone: range = range(0)) -> dict[str, str]:
    """Every user's pending set, with the ``changed`` users' new and the ``gone`` users done."""
    return {
        f"u{n:06d}": f"3-1765048500.{n:06d}-{1 if n in changed else 0}"
        for n in range(USERS)
        if n not in gone
    }


def test_the_cursor_tells_changed_users_from_requested_ones_among_100k() -> None:
    requested = Seen()
    for key, fingerprint in fingerprints().items():
        requested.add(key, fingerprint)
    seen = Seen.parse(requested.kept(fingerprints()).dumps())
    assert len(seen.digests) == USERS

    now = fingerprints(changed=range(500, 1_500), gone=range(90_000, USERS))
    unchanged = seen.unchanged(now)
    # New rows for 1,000 users make them changed; 10,000 users that are done are not pending.
    assert len(unchanged) == 89_000
    assert {k for k in now if k not in unchanged} == {f"u{n:06d}" for n in range(500, 1_500)}
    # What the cursor keeps: the requested pending sets still pending, nothing of the others.
    kept = seen.kept(now)
    assert len(kept.digests) == 89_000
    assert kept.unchanged(now) == unchanged
    assert Seen.parse(kept.dumps()).digests == kept.digests
