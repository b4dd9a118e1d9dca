"""Generate meshd's published test vectors from the code (protocol/vectors/*.json).

    PYTHONPATH=. python protocol/vectors/generate.py           write the files
    PYTHONPATH=. python protocol/vectors/generate.py --check   exit 1 if any file differs

Deterministic: every random input comes from `Draws(label)`, a BLAKE2b stream keyed by a
fixed label, and libsodium's sealed boxes (whose ephemeral key libsodium draws itself) are
made here from a drawn ephemeral key by libsodium's own construction, so they open with
crypto_box_seal_open like any other. Ed25519 signatures are deterministic. The vectors are
checked in; tests/protocol/test_vectors_current.py asserts the files equal what this script
produces now (code and vectors cannot drift), and tests/interop/ verifies every vector from
the spec pages with hashlib, PyNaCl, noiseprotocol and msgpack alone.

Every value is lowercase hex unless a field name says otherwise (`*_text`, `*_words`,
numbers, reasons). Each file names the spec pages it covers in "spec".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the vec_* modules beside this script, however it is loaded

from vec_backupset import backup_segment_vectors  # noqa: E402
from vec_circle import circle_vectors, recovery_vectors  # noqa: E402
from vec_log import log_vectors  # noqa: E402
from vec_pairing import pairing_vectors  # noqa: E402
from vec_sealed import backup_vectors, derive_key_vectors, discovery_vectors, envelope_vectors  # noqa: E402

# ---- all of them ---------------------------------------------------------------------


def build() -> dict[str, dict[str, Any]]:
    cpace, pairing, sas = pairing_vectors()
    return {
        "derive_key.json": derive_key_vectors(),
        "envelope.json": envelope_vectors(),
        "backup.json": backup_vectors(),
        "backup_segment.json": backup_segment_vectors(),
        "circle.json": circle_vectors(),
        "log.json": log_vectors(),
        "cpace.json": cpace,
        "pairing.json": pairing,
        "check_words.json": sas,
        "recovery.json": recovery_vectors(),
        "discovery.json": discovery_vectors(),
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, doc in build().items():
        path = HERE / name
        text = render(doc)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("stale vectors (run protocol/vectors/generate.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
