-- Initial schema. Never edit an applied migration: add a new numbered file instead.

-- A tenant owns adapters, files and jobs; `default` is the tenant of every caller when auth is off.
CREATE TABLE tenants (
    name        TEXT PRIMARY KEY,                 -- [a-z0-9][a-z0-9._-]{0,63}
    created_at  TEXT NOT NULL                     -- RFC 3339 UTC
);
INSERT INTO tenants (name, created_at) VALUES ('default', strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));

-- API keys: only a hash is stored; the key itself is shown once at creation.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,                 -- public id used by `keys revoke`
    tenant      TEXT NOT NULL REFERENCES tenants(name),
    key_hash    TEXT NOT NULL UNIQUE,             -- sha256 hex of the secret key
    created_at  TEXT NOT NULL,
    revoked_at  TEXT                              -- NULL while the key is valid
);

-- Adapter versions; a version is immutable once written. The newest version of a name is
-- what the bare name resolves to.
CREATE TABLE adapters (
    tenant          TEXT NOT NULL REFERENCES tenants(name),
    name            TEXT NOT NULL,                -- [a-z0-9][a-z0-9._-]{0,63}
    version         INTEGER NOT NULL,             -- 1, 2, ... per (tenant, name)
    rank            INTEGER NOT NULL,             -- LoRA r
    alpha           REAL NOT NULL,                -- lora_alpha
    target_modules  TEXT NOT NULL,                -- JSON array of module names
    size_bytes      INTEGER NOT NULL,             -- bytes of the safetensors file
    sha256          TEXT NOT NULL,                -- of adapter_config.json + weights
    source          TEXT NOT NULL CHECK (source IN ('upload', 'finetune')),
    job_id          TEXT,                         -- the finetune job that produced it
    created_at      TEXT NOT NULL,
    deleted_at      TEXT,                         -- soft delete: hidden, files removed later
    PRIMARY KEY (tenant, name, version)
);

-- Uploaded training files (JSONL), stored in the database.
CREATE TABLE files (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL REFERENCES tenants(name),
    filename    TEXT NOT NULL,                    -- client-supplied name, display only
    purpose     TEXT NOT NULL,                    -- 'fine-tune'
    bytes       INTEGER NOT NULL,
    records     INTEGER NOT NULL,                 -- number of JSONL records
    content     BLOB NOT NULL,
    created_at  TEXT NOT NULL
);

-- Fine-tuning jobs.
CREATE TABLE finetune_jobs (
    id              TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL REFERENCES tenants(name),
    method          TEXT NOT NULL CHECK (method IN ('sft', 'dpo')),
    status          TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    adapter_name    TEXT NOT NULL,
    adapter_version INTEGER,                      -- set on success
    request         TEXT NOT NULL,                -- the validated request as JSON
    step            INTEGER NOT NULL DEFAULT 0,   -- optimizer steps done
    total_steps     INTEGER NOT NULL DEFAULT 0,
    metrics         TEXT NOT NULL DEFAULT '{}',   -- latest metrics as JSON
    error           TEXT,                         -- reason when failed
    checkpoint_path TEXT,                         -- last checkpoint, for resume after restart
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT
);
CREATE INDEX finetune_jobs_by_status ON finetune_jobs (status, created_at);

-- Job events, in order.
CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL REFERENCES finetune_jobs(id),
    created_at  TEXT NOT NULL,
    level       TEXT NOT NULL,                    -- info | warning | error
    type        TEXT NOT NULL,                    -- message | metrics
    message     TEXT NOT NULL,
    data        TEXT                              -- JSON payload for metrics events
);
CREATE INDEX job_events_by_job ON job_events (job_id, id);
