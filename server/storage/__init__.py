"""Storage behind per-domain seams: each domain's Protocol and row records here (identity, consent,
profiles, keys, nudges, privacy, timeline), their SQLite implementations in `sqlite/`, the bundle
of all of them in `backend`, and the SQLite database itself (`db`, migrations).
"""
