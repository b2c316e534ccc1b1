"""User partitions: one dynamic partition per user, with a reversible key for odd user ids.

Dagster refuses partition keys containing "...", control characters and the like, and a comma
or bracket makes keys hard to use in ranges and the UI. Such user ids (and any id that already
looks encoded) get the key ``u64:<urlsafe base64>``; every other id is its own key, so the UI
shows plain names for ordinary users.
"""

from __future__ import annotations

import base64
import functools
import re

from dagster import DynamicPartitionsDefinition

users_partitions = DynamicPartitionsDefinition(name="users")

_PREFIX = "u64:"
_PLAIN = re.compile(r"^[\w@.+\-=:/ #&'()!$%*;?~^|\"<>{}\u00a0-\uffff]{1,200}$")


# The sensor turns every pending user into its key each tick (100,000 users: about 0.1 s); the
# process evaluating it lives across ticks, so each user's key is worked out once.
@functools.lru_cache(maxsize=1 << 18)
def user_to_key(user_id: str) -> str:
    if (
        _PLAIN.match(user_id)
        and "..." not in user_id
        and not user_id.startswith(_PREFIX)
        and user_id == user_id.strip()
    ):
        return user_id
    return _PREFIX + base64.urlsafe_b64encode(user_id.encode()).decode()


def key_to_user(key: str) -> str:
    if key.startswith(_PREFIX):
        return base64.urlsafe_b64decode(key[len(_PREFIX) :].encode()).decode()
    return key
