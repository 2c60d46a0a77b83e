//! The configuration server (DESIGN 2, 4): the control plane an operator talks to. This layer
//! holds its state directory (`server.toml`, the SQLite database, the site's CA), serves the
//! REST API over HTTPS with bearer tokens and roles, audits every change and every denied
//! request, and describes the API in an OpenAPI document generated from the code.
//!
//! ```text
//! client ──HTTPS──▶ accept loop (rustls) ─▶ router ─▶ auth (token → role; denied: 401/403,
//!                                                    audited) ─▶ handler ─▶ db (SQLite)
//! ```

pub mod api;
pub mod auth;
pub mod backup;
pub mod components;
pub mod config;
pub mod db;
pub mod inventory;
pub mod jobs;
pub mod policy;
pub mod preflight;
mod serve;
pub mod status;

pub use config::{Init, ServerConfig, init};
pub use serve::{Prepared, ServeError, prepare, serve};
