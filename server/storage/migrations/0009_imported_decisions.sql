-- Decisions logged elsewhere (e.g. a micro-randomized trial), imported with
-- `pulsesync nudges import-log` (format: server/nudges/importlog.py, docs/nudges.md). Training
-- and evaluation read them beside nudge_decisions; their people are not server users.
CREATE TABLE imported_people (
    person_key      INTEGER PRIMARY KEY,        -- the decisions' user id is -person_key
    source          TEXT NOT NULL,              -- the imported file's name
    person          TEXT NOT NULL,              -- the person's id in that file
    UNIQUE (source, person)
);

CREATE TABLE imported_decisions (
    row_id          INTEGER PRIMARY KEY,
    source          TEXT NOT NULL,
    person_key      INTEGER NOT NULL REFERENCES imported_people(person_key),
    decision_us     INTEGER NOT NULL,           -- UTC
    features        TEXT NOT NULL,              -- JSON object: the context features given
    options         TEXT NOT NULL,              -- JSON object: action -> logged probability
    chosen          TEXT NOT NULL,
    probability     REAL NOT NULL,              -- options[chosen], in (0, 1]
    outcome_steps   REAL NOT NULL               -- steps in the 30 min after decision_us
);
CREATE INDEX imported_decisions_by_source ON imported_decisions(source);
