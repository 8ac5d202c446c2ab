-- Privacy: an audit log of exports, erasures and admin reads, and deletion receipts.
-- Neither table has a user_id column on purpose: both must outlive the person's erasure, so
-- they name the person only by a keyed pseudonym (HMAC under the server's receipt key) and
-- hold no identifiers, payloads or secrets.

CREATE TABLE privacy_audit (
    audit_id    INTEGER PRIMARY KEY,
    at_us       INTEGER NOT NULL,
    action      TEXT NOT NULL,              -- export, erase, summary, consent, retention
    actor       TEXT NOT NULL,              -- device (the person), admin (CLI), system
    subject     TEXT NOT NULL,              -- pseudonym of the person, "" for system-wide work
    detail      TEXT NOT NULL               -- JSON: counts, sizes, receipt id; never data
);

CREATE TABLE deletion_receipts (
    receipt_id      TEXT PRIMARY KEY,
    erase_us        INTEGER NOT NULL,
    subject_hash    TEXT NOT NULL,          -- SHA-256(salt || user name); the salt is only in the receipt
    deleted_counts  TEXT NOT NULL,          -- JSON {record type: rows}
    signature       TEXT NOT NULL           -- HMAC-SHA256 over the canonical receipt
);
