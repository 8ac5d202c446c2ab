-- Where each person's devices take nudges across replicas, so the replica deciding for a
-- person counts the devices reachable through another replica (server/storage/postgres/reach.py).
-- PostgreSQL only: on SQLite one process holds every stream and sees every fetch.

-- SubscribeNudges streams open on each replica: written by the replica holding the stream
-- when it opens and closes; a row counts only while its replica's membership of the
-- "nudges" lease group is live (lease_members), and rows of replicas gone for longer than
-- the lease TTL are deleted by the others. Cluster state (it names replicas): stays on the
-- coordinator beside lease_members when sharded; user_id is kept for reading by shard of
-- people and for erasure.
CREATE TABLE nudge_streams (
    member      text NOT NULL,                  -- the replica (lease_members.holder)
    device_pk   bigint NOT NULL,
    user_id     bigint NOT NULL,
    device_id   text NOT NULL,
    kind        integer NOT NULL,
    since_us    bigint NOT NULL,                -- when the stream opened (database clock)
    PRIMARY KEY (member, device_pk)
);
-- The deciding replica reads the streams of the people due for a decision.
CREATE INDEX nudge_streams_user ON nudge_streams (user_id);

-- When each device last fetched its pending nudges (FetchPendingNudges), on any replica: an
-- app that fetched lately counts as reachable by fetching. Per person: distributed by user_id
-- with the other per-person tables when sharded.
CREATE TABLE nudge_fetches (
    user_id     bigint NOT NULL,
    device_pk   bigint NOT NULL,
    device_id   text NOT NULL,
    kind        integer NOT NULL,
    fetched_us  bigint NOT NULL,                -- the server's clock, as the decisions' times
    PRIMARY KEY (user_id, device_pk)
);
