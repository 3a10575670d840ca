//! Tokenizer from tokenizer.json or GGUF metadata, and the chat template (minijinja).
