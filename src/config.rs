//! Settings: config/default.toml, an optional --config file, ADAPTERD_* env and CLI flags.
