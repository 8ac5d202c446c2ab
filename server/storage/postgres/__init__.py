"""PostgreSQL as the system of record, for several server replicas over one database.

The pieces here speak asyncpg (chosen by measurement, docs/scaling.md): a connection pool whose
transactions are cancellation-safe (`pool`), versioned migrations safe to run from several
replicas at once (`migrate`), the ingest writer (`events`), the cross-replica doorbell on
LISTEN/NOTIFY (`doorbell`) and leases over shards of people (`leases`).
"""
