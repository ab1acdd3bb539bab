//! The output's `config.json`: the base's bytes with only what the conversion changed edited in place, so the
//! rest of the file (key order, number spelling, indentation) stays byte for byte as transformers wrote it.
//!
//! A small scanner finds the spans to edit; `serde_json` has already checked the file is valid JSON (in
//! [`super::BaseModel::open`]), and re-serializing it would respell numbers (`1e-06` as `1e-6`) and reorder keys.

use crate::dtype::DType;

/// Deepest nesting scanned; a config deeper than this is left as it is.
const MAX_DEPTH: usize = 128;

/// The dtype names transformers writes for float weights (`torch_dtype`/`dtype` values).
const FLOAT_NAMES: [&str; 10] =
    ["float32", "float16", "bfloat16", "float64", "float", "half", "double", "fp32", "fp16", "bf16"];

/// `config.json` for the output, or `None` when nothing changes: after a cast to `cast`, every `torch_dtype`
/// and `dtype` naming a float type (at the top and in sub-configs such as `text_config`) names the new one; when
/// the weights were dequantized, every `quantization_config` is removed.
pub fn output_config(bytes: &[u8], cast: Option<DType>, dequantized: bool) -> Option<Vec<u8>> {
    let mut scan = Scan { b: bytes, i: 0, edits: Vec::new(), cast: cast.map(DType::torch_name), dequantized };
    scan.ws();
    scan.value(0)?;
    if scan.edits.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    for (a, b, with) in scan.edits {
        out.extend_from_slice(&bytes[at..a]);
        out.extend_from_slice(&with);
        at = b;
    }
    out.extend_from_slice(&bytes[at..]);
    Some(out)
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// Replace `[a, b)` with the bytes, in increasing, non-overlapping order.
    edits: Vec<(usize, usize, Vec<u8>)>,
    cast: Option<&'static str>,
    dequantized: bool,
}

impl Scan<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    /// Skips a string; returns its contents' span (without quotes).
    fn string(&mut self) -> Option<(usize, usize)> {
        (self.b.get(self.i) == Some(&b'"')).then_some(())?;
        let start = self.i + 1;
        self.i = start;
        loop {
            match self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some((start, self.i - 1));
                }
                b'\\' => self.i += 2,
                _ => self.i += 1,
            }
        }
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.b.get(self.i)? {
            b'{' => self.object(depth),
            b'[' => {
                self.i += 1;
                loop {
                    self.ws();
                    match self.b.get(self.i)? {
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        b',' => self.i += 1,
                        _ => self.value(depth + 1)?,
                    }
                }
            }
            b'"' => self.string().map(|_| ()),
            _ => {
                while self.b.get(self.i).is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace()) {
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        self.i += 1;
        // End of the previous member's value, and a removal waiting for the next key (a first member's).
        let mut prev_end: Option<usize> = None;
        let mut pending: Option<usize> = None;
        loop {
            self.ws();
            match self.b.get(self.i)? {
                b'}' => {
                    if let Some(a) = pending {
                        // The only member: remove it, keeping the braces.
                        let end = prev_end.unwrap_or(a);
                        self.edits.push((a, end, Vec::new()));
                    }
                    self.i += 1;
                    return Some(());
                }
                b',' => {
                    self.i += 1;
                    continue;
                }
                _ => {}
            }
            let key_start = self.i;
            if let Some(a) = pending.take() {
                self.edits.push((a, key_start, Vec::new()));
            }
            let (ka, kb) = self.string()?;
            let key = &self.b[ka..kb];
            self.ws();
            (self.b.get(self.i) == Some(&b':')).then_some(())?;
            self.i += 1;
            self.ws();
            let value_start = self.i;
            let edits_before = self.edits.len();
            self.value(depth + 1)?;
            let value_end = self.i;
            match key {
                b"torch_dtype" | b"dtype" => {
                    let text = &self.b[value_start..value_end];
                    let named = text.len() >= 2 && FLOAT_NAMES.iter().any(|n| &text[1..text.len() - 1] == n.as_bytes());
                    if let (Some(to), true) = (self.cast, named) {
                        self.edits.push((value_start, value_end, format!("\"{to}\"").into_bytes()));
                    }
                }
                b"quantization_config" if self.dequantized => {
                    self.edits.truncate(edits_before);
                    match prev_end {
                        Some(p) => self.edits.push((p, value_end, Vec::new())),
                        None => pending = Some(key_start),
                    }
                }
                _ => {}
            }
            prev_end = Some(value_end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(s: &str, cast: Option<DType>, deq: bool) -> String {
        output_config(s.as_bytes(), cast, deq).map(|b| String::from_utf8(b).unwrap()).unwrap_or_else(|| s.into())
    }

    #[test]
    fn a_cast_renames_every_float_dtype_and_nothing_else() {
        let cfg = "{\n  \"a\": 1e-06,\n  \"text_config\": {\"dtype\": \"float32\", \"x\": \"dtype\"},\n  \"torch_dtype\": \"float32\"\n}\n";
        let want = "{\n  \"a\": 1e-06,\n  \"text_config\": {\"dtype\": \"bfloat16\", \"x\": \"dtype\"},\n  \"torch_dtype\": \"bfloat16\"\n}\n";
        assert_eq!(edit(cfg, Some(DType::BF16), false), want);
        assert_eq!(output_config(cfg.as_bytes(), None, false), None);
        // Not a float dtype (an int8 quantized model's, or "auto"): left alone.
        assert_eq!(output_config(b"{\"torch_dtype\": \"auto\"}", Some(DType::F16), false), None);
    }

    #[test]
    fn dequantizing_removes_quantization_config_wherever_it_sits() {
        let q = "\"quantization_config\": {\"a\": [1, {\"b\": \"}\"}]}";
        assert_eq!(edit(&format!("{{\"x\": 1, {q}, \"y\": 2}}"), None, true), "{\"x\": 1, \"y\": 2}");
        assert_eq!(edit(&format!("{{{q}, \"y\": 2}}"), None, true), "{\"y\": 2}");
        assert_eq!(edit(&format!("{{\"x\": 1, {q}}}"), None, true), "{\"x\": 1}");
        assert_eq!(edit(&format!("{{{q}}}"), None, true), "{}");
        assert_eq!(
            edit(&format!("{{\"t\": {{{q}, \"dtype\": \"bfloat16\"}}}}"), Some(DType::F32), true),
            "{\"t\": {\"dtype\": \"float32\"}}"
        );
    }
}
