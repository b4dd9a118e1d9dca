"""Device names chosen after joining: `meshctl rename`, shared through the device's own log.

A device's name starts as the one in its circle membership record (its `device_name` when it
created or joined the circle). The membership records have no rename, and need none: a
device renames itself by writing its new name to the reserved stream `meshd/names` of its
own log (record id: its signing key in hex; body: the name, 1..64 bytes of UTF-8). The entry
is signed by the device and syncs like any other, over the LAN and through relays. A name
counts only when the record's author is the device it names, so no device can rename
another; the latest write wins (the log's view order).
"""

from __future__ import annotations

from .net.logsync import LogService

NAMES_STREAM = "meshd/names"
MAX_NAME_BYTES = 64
PAGE = 500


class BadName(ValueError):
    pass


def check_name(name: str) -> str:
    name = name.strip()
    if not 0 < len(name.encode()) <= MAX_NAME_BYTES or not name.isprintable():
        raise BadName(f"a device name is 1 to {MAX_NAME_BYTES} bytes of printable UTF-8")
    return name


def chosen_names(logs: LogService) -> dict[bytes, str]:
    """sign key -> the name the device gave itself (only its own records count)."""
    names: dict[bytes, str] = {}
    after: str | None = None
    while True:
        page = logs.read(NAMES_STREAM, after=after, limit=PAGE)
        for record in page["records"]:
            if record["author"] != record["id"]:
                continue  # a device names only itself
            try:
                names[bytes.fromhex(record["id"])] = check_name(record["body"].decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue  # not a name: ignored, never shown
        after = page["next"]
        if after is None:
            return names


async def rename(logs: LogService, name: str) -> str:
    name = check_name(name)
    await logs.write(NAMES_STREAM, logs.author.hex(), name.encode())
    return name
