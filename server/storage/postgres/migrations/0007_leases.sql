-- Leases: work that one replica at a time must do (a shard of people's nudge decisions, a
-- cluster-wide job) is leased in rows with an expiry; server/storage/postgres/leases.py.
-- Not per-person: these stay on the coordinator when sharded.

-- Replicas taking part in a lease group, with a heartbeat: the fair share of each is the
-- group's shards over the live members.
CREATE TABLE lease_members (
    grp         text NOT NULL,
    holder      text NOT NULL,                  -- a replica's random id
    expire_us   bigint NOT NULL,
    PRIMARY KEY (grp, holder)
);

CREATE TABLE leases (
    grp         text NOT NULL,
    shard       integer NOT NULL,
    holder      text NOT NULL,                  -- '' when free
    expire_us   bigint NOT NULL,                -- the lease is void at and after this time
    epoch       bigint NOT NULL,                -- +1 at every change of holder: a fencing token
    PRIMARY KEY (grp, shard)
);
