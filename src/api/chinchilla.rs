//! `GET /v1/chinchilla` and the `GET /chinchilla` page.
