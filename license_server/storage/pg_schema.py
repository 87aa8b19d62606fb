"""The shared database's schema, as numbered migrations; a node applies those its database lacks at start.

Each table has one owner in `storage/` (named beside it), and nothing else reads or writes it. Times are
unix seconds as `double precision`, as the SQLite stores keep them, so that reports read either alike;
the ones that decide who holds a seat come from the database's own clock.
A migration is never edited once released: a change is a new one at the end.
"""

from __future__ import annotations

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    applied timestamptz NOT NULL DEFAULT now()
)"""

_V1 = (
    # Owner: storage.pg_answers (kept answers) and storage.pg_answers.shared_fingerprint_key (settings).
    """CREATE TABLE settings (
        name  text PRIMARY KEY,
        value bytea NOT NULL
    )""",
    """CREATE TABLE answers (
        cache_key    bytea PRIMARY KEY,
        method       text NOT NULL,
        product_id   text NOT NULL,
        license_key  text NOT NULL,
        machine_code text NOT NULL,
        fetched_at   double precision NOT NULL,
        body         bytea NOT NULL,
        digest       bytea NOT NULL
    )""",
    "CREATE INDEX answers_license ON answers (product_id, license_key, machine_code)",
    # What each drop of kept answers dropped, for the nodes that missed its NOTIFY; pruned after an hour.
    """CREATE TABLE answer_drops (
        id      bigserial PRIMARY KEY,
        at      double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp()),
        payload text NOT NULL
    )""",
    "CREATE INDEX answer_drops_at ON answer_drops (at)",
    # Owner: storage.pg_seats (the seat ledger; times of leases from the database's clock).
    """CREATE TABLE licenses (
        product_id   text NOT NULL,
        license_key  text NOT NULL,
        max_machines integer NOT NULL,
        updated      double precision NOT NULL,
        PRIMARY KEY (product_id, license_key)
    )""",
    """CREATE TABLE machines (
        product_id    text NOT NULL,
        license_key   text NOT NULL,
        machine_code  text NOT NULL,
        friendly_name text NOT NULL,
        client        text NOT NULL,
        floating      boolean NOT NULL,
        first_seen    double precision NOT NULL,
        last_seen     double precision NOT NULL,
        calls         bigint NOT NULL,
        deactivated   double precision,
        PRIMARY KEY (product_id, license_key, machine_code)
    )""",
    "CREATE INDEX machines_last_seen ON machines (last_seen)",
    "CREATE INDEX machines_name ON machines (lower(friendly_name))",
    """CREATE TABLE leases (
        id           bigserial PRIMARY KEY,
        product_id   text NOT NULL,
        license_key  text NOT NULL,
        machine_code text NOT NULL,
        started      double precision NOT NULL,
        expires      double precision NOT NULL,
        released     double precision,
        overdraft    boolean NOT NULL,
        renewals     integer NOT NULL DEFAULT 0,
        granted_by   text NOT NULL,
        node         text NOT NULL,
        open         boolean NOT NULL DEFAULT true
    )""",
    # One open lease per machine and license, whichever node granted it.
    "CREATE UNIQUE INDEX leases_one_open ON leases (product_id, license_key, machine_code) WHERE open",
    "CREATE INDEX leases_license_time ON leases (product_id, license_key, started)",
    "CREATE INDEX leases_license_expires ON leases (product_id, license_key, expires)",
    """CREATE TABLE activity (
        product_id   text NOT NULL,
        license_key  text NOT NULL,
        hour         bigint NOT NULL,
        machine_code text NOT NULL,
        floating     boolean NOT NULL,
        calls        bigint NOT NULL,
        PRIMARY KEY (product_id, license_key, hour, machine_code)
    )""",
    """CREATE TABLE denials (
        id           bigserial PRIMARY KEY,
        product_id   text NOT NULL,
        license_key  text NOT NULL,
        machine_code text NOT NULL,
        time         double precision NOT NULL,
        denied_by    text NOT NULL,
        message      text NOT NULL,
        node         text NOT NULL
    )""",
    "CREATE INDEX denials_license_time ON denials (product_id, license_key, time)",
    # Owner: storage.pg_audit (each node's chain of records, its head anchored here).
    """CREATE TABLE audit_records (
        node text NOT NULL,
        seq  bigint NOT NULL,
        time double precision NOT NULL,
        line bytea NOT NULL,
        PRIMARY KEY (node, seq)
    )""",
    "CREATE INDEX audit_records_time ON audit_records (time)",
    """CREATE TABLE audit_heads (
        node    text PRIMARY KEY,
        seq     bigint NOT NULL,
        hash    text NOT NULL,
        updated double precision NOT NULL
    )""",
    # Owner: storage.pg_sessions (console logins valid on every node; ids kept only as hashes).
    """CREATE TABLE console_sessions (
        sid_hash bytea PRIMARY KEY,
        csrf     text NOT NULL,
        who      text NOT NULL,
        client   text NOT NULL,
        expires  double precision NOT NULL
    )""",
    # Owner: storage.pg_nodes (heartbeats: which nodes run; seen by the database's clock; boot: the run).
    """CREATE TABLE nodes (
        name    text PRIMARY KEY,
        version text NOT NULL,
        started double precision NOT NULL,
        seen    double precision NOT NULL,
        boot    text NOT NULL DEFAULT ''
    )""",
    # Owner: storage.spool (ids of each node's spooled writes already applied: a replay never applies twice).
    """CREATE TABLE applied_spool (
        node text NOT NULL,
        id   bigint NOT NULL,
        PRIMARY KEY (node, id)
    )""",
)

_V2 = (
    # Owner: storage.pg_seats. The seconds a refused machine asked a seat for (0: node-locked; NULL: denied
    # before this was kept), for `report plan`. Nullable, so a node of version 1 still inserts denials.
    "ALTER TABLE denials ADD COLUMN floating_interval double precision",
)

_V3 = (
    # Owner: storage.pg_answers. An Activate answer's runway facts (signatures.runway_facts), for `report
    # runway` without parsing every body. Nullable, so a node of an earlier version still writes answers.
    "ALTER TABLE answers ADD COLUMN facts text",
)

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = ((1, _V1), (2, _V2), (3, _V3))
LATEST = MIGRATIONS[-1][0]
