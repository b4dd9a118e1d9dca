"""The PostgreSQL relay storage's schema, as numbered migrations (relay/postgres.py applies
them; the version reached is kept in the database's relay_schema table)."""

from __future__ import annotations

# Each entry migrates the schema from version index to index + 1. Append only.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE circles (
        circle_id BYTEA PRIMARY KEY,
        records BYTEA NOT NULL                  -- msgpack array of encoded records
    );
    CREATE TABLE envelopes (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused
        circle_id BYTEA NOT NULL,
        mailbox BYTEA NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        envelope BYTEA NOT NULL
    );
    CREATE INDEX envelopes_by_mailbox ON envelopes (circle_id, mailbox, id);
    CREATE INDEX envelopes_by_expiry ON envelopes (expires_at);
    CREATE TABLE backups (
        circle_id BYTEA PRIMARY KEY,
        version BIGINT NOT NULL,
        blob BYTEA NOT NULL
    );
    """,
    # 2: rendezvous offers, so a join at one process reaches the offer held by another.
    """
    CREATE TABLE rendezvous_offers (
        nameplate INTEGER PRIMARY KEY,
        address TEXT NOT NULL,                  -- HOST:PORT of the process holding it
        expires_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 3: the storage's metadata; 'incarnation' is created with it (see _migrate).
    """
    CREATE TABLE relay_meta (
        key TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    """,
    # 4: backup segments (issue 20: incremental backup), immutable blobs named by the device.
    """
    CREATE TABLE segments (
        circle_id BYTEA NOT NULL,
        id BYTEA NOT NULL,
        blob BYTEA NOT NULL,
        PRIMARY KEY (circle_id, id)
    );
    """,
    # 5: the key that stored each segment (relay.segment_list). The rows stored before read
    # b"" (listed to every member; a constant default costs no rewrite), and the default is
    # dropped: a process still running the version before stores NULL (listed to no one:
    # it may be another member's upload in flight; backend.py).
    """
    ALTER TABLE segments ADD COLUMN device BYTEA DEFAULT ''::bytea;
    ALTER TABLE segments ALTER COLUMN device DROP DEFAULT;
    """,
    # 6: a page of segments_of reads the key's rows and the b"" rows by this index, never the
    # rows of the circle's other keys (SEGMENTS_OF).
    """
    CREATE INDEX segments_by_device ON segments (circle_id, device, id);
    """,
)
# One page of relay.segment_list: each side reads at most `limit` rows by segments_by_device;
# UNION (not ALL): a key b"" would list the old rows twice.
SEGMENTS_OF = """
(SELECT id, octet_length(blob) AS size FROM segments
    WHERE circle_id = %(circle)s AND device = %(device)s AND id > %(after)s ORDER BY id LIMIT %(limit)s)
UNION
(SELECT id, octet_length(blob) AS size FROM segments
    WHERE circle_id = %(circle)s AND device = ''::bytea AND id > %(after)s ORDER BY id LIMIT %(limit)s)
ORDER BY id LIMIT %(limit)s"""
INCARNATION_BYTES = 16
