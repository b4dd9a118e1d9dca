"""A real daemon on the pre-fix epoch rule (run: python -m tests.integration.old_epoch_rule run ...).

It is `meshd` with one patch, the bug of issue 14: an epoch *number* resolves to the counting
record with the highest hash, not to the current record, nor to records sealed to no removed
key (protocol/circle.md, "An epoch is the record that made it"). bench/circle_attacks.py
measures its baseline with it; a test that passes against it would not catch the bug.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from meshd.cmd.meshd import meshd_main
from meshd.protocol import epochs
from meshd.protocol.circledag import CircleDag
from meshd.protocol.records import Record


def _highest_hash(circle: CircleDag) -> Callable[[Record], tuple[bool, bool, bool, bytes]]:
    return lambda record: (False, False, False, record.hash)


epochs.rank = _highest_hash

if __name__ == "__main__":
    sys.exit(meshd_main())
