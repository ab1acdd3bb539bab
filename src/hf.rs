//! The base Hugging Face model folder: its config, and the files every output folder gets a copy of.
//!
//! Config, generation config, tokenizer, chat template, processor files, `dataset_statistics.json` and
//! remote-code `*.py` are copied; the base model's weights and weight index never are.

use crate::error::{Error, ErrorKind, Result};
use crate::io::Folder;
use crate::write::Sink;

/// Whether a top-level file of a base model folder belongs in the output.
pub fn is_package_file(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "added_tokens.json",
        "merges.txt",
        "chat_template.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "dataset_statistics.json",
    ];
    EXACT.contains(&name)
        || name.starts_with("vocab.")
        || name.ends_with(".tiktoken")
        || (name.ends_with(".py") && !name.contains('/'))
}

/// A base model folder.
pub struct BaseModel<'f> {
    /// The folder.
    pub folder: &'f dyn Folder,
    /// Its parsed `config.json`.
    pub config: serde_json::Value,
    /// The files to copy, sorted.
    pub files: Vec<String>,
}

impl<'f> BaseModel<'f> {
    /// Reads `config.json` and lists the files to copy.
    pub fn open(folder: &'f dyn Folder) -> Result<BaseModel<'f>> {
        let files = folder.files();
        if !files.iter().any(|f| f == "config.json") {
            return Err(Error::new(ErrorKind::NotCheckpoint("the base model folder has no config.json".into()))
                .in_file(folder.name()));
        }
        let input = folder.open("config.json")?;
        if input.len() > 16 << 20 {
            return Err(Error::new(ErrorKind::Limit("config.json larger than 16 MiB".into())).in_file(&input.name));
        }
        let bytes = input.read_vec(0, input.len())?;
        let config: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(ErrorKind::NotCheckpoint(format!("config.json is not valid JSON: {e}"))).in_file(&input.name)
        })?;
        let mut files: Vec<String> = files.into_iter().filter(|f| is_package_file(f)).collect();
        files.sort();
        Ok(BaseModel { folder, config, files })
    }

    /// An integer field of the config (also looked up in `text_config` for multimodal configs).
    pub fn int(&self, key: &str) -> Option<u64> {
        self.config.get(key).or_else(|| self.config.get("text_config").and_then(|t| t.get(key)))?.as_u64()
    }

    /// A boolean field of the config.
    pub fn flag(&self, key: &str) -> Option<bool> {
        self.config.get(key).or_else(|| self.config.get("text_config").and_then(|t| t.get(key)))?.as_bool()
    }

    /// A string field of the config.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.config.get(key)?.as_str()
    }

    /// Sizes of the files to copy, for reports and progress.
    pub fn copy_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for f in &self.files {
            total += self.folder.open(f)?.len();
        }
        Ok(total)
    }

    /// Streams every package file into `sink` (the caller commits).
    pub fn copy_into(&self, sink: &mut dyn Sink) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        for f in &self.files {
            let input = self.folder.open(f)?;
            sink.begin(f, input.len())?;
            let mut at = 0u64;
            while at < input.len() {
                let n = (input.len() - at).min(buf.len() as u64) as usize;
                input.read_exact_at(at, &mut buf[..n])?;
                sink.write(&buf[..n])?;
                at += n as u64;
            }
            sink.end()?;
        }
        Ok(())
    }
}
