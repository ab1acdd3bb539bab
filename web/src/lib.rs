//! ckptconv in the browser: a thin wasm-bindgen facade over the core, meant to run in a dedicated Web Worker.
//!
//! Inputs are `File`s with their relative paths (so dropped folders work) read through `FileReaderSync` on
//! `Blob.slice`, never whole. Output is pulled: [`Job::next`] returns the next piece (a file start, a chunk of
//! bytes, a file end), so JS writes one piece at a time (to an OPFS sync access handle, or a stream) and the
//! conversion never runs ahead of the writes. Every size is known from the plan before the first byte.
#![deny(clippy::unwrap_used, clippy::expect_used)]

#[cfg(target_arch = "wasm32")]
mod wasm;
#[cfg(target_arch = "wasm32")]
pub use wasm::*;
