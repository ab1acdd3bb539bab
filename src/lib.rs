//! ckptconv: training checkpoints to Hugging Face safetensors, with no Python, no torch and no mmap.
//!
//! The pipeline is: open inputs ([`io`]) -> read the format's metadata ([`torch`]) -> build a [`plan::Plan`]
//! of output tensors -> stream them band by band into a [`write::Sink`]. Nothing from an input is executed,
//! and memory stays bounded whatever the model size.
#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod conversion;
pub mod dcp;
pub mod deepspeed;
pub mod detect;
pub mod dtype;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod hf;
pub mod hfset;
pub mod io;
pub mod lora;
pub mod megatron;
pub mod pickle;

pub use error::{Error, ErrorKind, Result, display_safe};
pub mod plan;
pub mod planned;
#[cfg(feature = "yaml")]
pub mod rlinf;
pub mod safetensors_header;
pub mod scan;
pub mod select;
pub mod torch;
pub mod verify;
pub mod verl;
pub mod write;
