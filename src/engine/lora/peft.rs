//! PEFT adapter parsing and validation (being written).
