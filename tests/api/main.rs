//! Integration tests: the real app on 127.0.0.1:0 serving a tiny seeded model.

mod adapters;
mod auth;
mod errors;
mod files;
mod finetune;
mod generate;
mod helpers;
mod int8_copies;
mod openai;
mod ops;
mod portable;
mod prefix_cache;
mod structured;
mod tools;
