"""Names and ids that clients choose or are given: they become file names, so they are checked
once, here, against one pattern."""

import re

from byorl.service.exceptions import NotFound

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, kind: str) -> str:
    """Ids and names become file names: allow no path tricks (a name that cannot exist is
    simply not found)."""
    if not NAME.match(name):
        raise NotFound(kind, name)
    return name
