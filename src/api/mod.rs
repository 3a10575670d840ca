//! HTTP surface: one router per resource, composed in [`router`]. Handlers validate input into
//! engine types and never touch tensors.

pub mod chinchilla;
pub mod error;

pub use error::ApiError;
