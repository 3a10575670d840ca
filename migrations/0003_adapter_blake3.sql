-- A second, much faster hash of the same bytes (adapter_config.json then the weights), checked
-- on every load: sha256 stays the public identity shown by the API, while BLAKE3 lets a cold
-- load verify a 20 MB adapter in a few milliseconds. NULL for rows written before it existed;
-- those are checked against sha256.
ALTER TABLE adapters ADD COLUMN blake3 TEXT;
