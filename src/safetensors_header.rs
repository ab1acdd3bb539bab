//! The one safetensors header reader: for `verify`, the base model's weight shapes, and the safetensors
//! items of DCP folders saved with `SerializationFormat.SAFETENSORS`.
//!
//! It reads the 8-byte length and then only the JSON header through [`Input`] (never the tensor data), and
//! checks it as the `safetensors` crate does: a capped header length, a known dtype, a shape and two offsets
//! per entry, sizes computed with `checked_mul`, offsets contiguous from 0, and the data inside the file.
//! A whole file ([`read_file`]) must also end exactly where its data ends; a DCP item ([`read_item`]) starts
//! wherever `.metadata` says (torch writes the byte items of a rank first) and need only fit in its file.
//!
//! The crate itself is not used: its `TensorInfo` holds shapes and offsets as `usize`, 32 bits on wasm32, so
//! in WASI and the browser it refuses the header of any file holding more than 4 GiB of data (a 5 GB shard)
//! that the native build reads. Offsets here are `u64` on every target. The crate is the tests' oracle instead.

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::io::Input;
use std::collections::BTreeMap;

/// Largest safetensors header read (HF files stay far below it; the crate's own cap is 100 MB).
pub const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// `[begin, end)` of its bytes, relative to [`Header::data_start`].
    pub offsets: [u64; 2],
}

/// A checked safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Every tensor by name (`__metadata__` is not a tensor and is left out).
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Where the data starts in the input: just past the header.
    pub data_start: u64,
    /// Bytes of tensor data: the end of the last tensor.
    pub data_len: u64,
}

/// Reads the header of a whole safetensors file, whose data must end exactly at the end of the file.
pub fn read_file(input: &Input) -> Result<Header> {
    read(input, None)
}

/// Reads the header of a safetensors item starting at byte `at` of `input` (a DCP `.distcp`), whose data
/// must lie inside the file.
pub fn read_item(input: &Input, at: u64) -> Result<Header> {
    read(input, Some(at))
}

/// One header entry as written; checked by [`read`] (a missing field is refused there, with its name).
#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: Option<String>,
    shape: Option<Vec<u64>>,
    data_offsets: Option<Vec<u64>>,
}

/// The header's entries in file order, `__metadata__` skipped. Typed straight from the JSON (a tree of
/// `serde_json::Value`s cost an allocation per field: most of the time of a 100,000-tensor header).
struct RawHeader(Vec<(String, RawEntry)>);

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
                let mut v = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if name == "__metadata__" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    } else {
                        v.push((name, map.next_value::<RawEntry>()?));
                    }
                }
                Ok(RawHeader(v))
            }
        }
        d.deserialize_map(Entries)
    }
}

fn read(input: &Input, item_at: Option<u64>) -> Result<Header> {
    let at = item_at.unwrap_or(0);
    let bad = |m: String| {
        let m = match item_at {
            None => format!("bad safetensors file: {m}"),
            Some(at) => format!("bad safetensors item at byte {at}: {m}"),
        };
        Error::new(ErrorKind::NotCheckpoint(m)).in_file(&input.name)
    };
    let mut n = [0u8; 8];
    input.read_exact_at(at, &mut n)?;
    let n = u64::from_le_bytes(n);
    let data_start = at.checked_add(8).and_then(|h| h.checked_add(n)).filter(|&e| e <= input.len());
    let Some(data_start) = data_start else {
        return Err(bad(format!("header length {n} does not fit the {}-byte file", input.len())));
    };
    if n > MAX_HEADER {
        let m = format!("safetensors header of {n} bytes at byte {at} (at most {MAX_HEADER} are read)");
        return Err(Error::new(ErrorKind::Limit(m)).in_file(&input.name));
    }
    let bytes = input.read_vec(at + 8, n)?;
    let entries: RawHeader = serde_json::from_slice(&bytes).map_err(|e| match item_at {
        // The item was sniffed as safetensors only because it is not a zip: say both.
        Some(at) => Error::new(ErrorKind::NotCheckpoint(format!(
            "item at byte {at} is neither a torch.save zip nor safetensors: {e}"
        )))
        .in_file(&input.name),
        None => bad(format!("header JSON: {e}")),
    })?;
    let mut tensors = BTreeMap::new();
    let mut ranges = Vec::with_capacity(entries.0.len());
    for (name, e) in entries.0 {
        let dtype = e.dtype.as_deref().and_then(DType::from_safetensors_name);
        let (Some(dtype), Some(shape), Some(&[a, b])) = (dtype, e.shape, e.data_offsets.as_deref()) else {
            return Err(bad(format!("entry '{name}' lacks a known dtype, a shape or two data offsets")));
        };
        let numel = shape.iter().try_fold(1u64, |x, &d| x.checked_mul(d));
        let want = numel.and_then(|x| x.checked_mul(dtype.size() as u64));
        if b < a || Some(b - a) != want {
            return Err(bad(format!(
                "entry '{name}': offsets {a}..{b} do not hold a {shape:?} {}",
                dtype.safetensors_name()
            )));
        }
        ranges.push((a, b));
        if let Some(_twice) = tensors.insert(name, TensorEntry { dtype, shape, offsets: [a, b] }) {
            return Err(bad("a tensor name appears twice in the header".into()));
        }
    }
    ranges.sort_unstable();
    let mut data_len = 0;
    for &(a, b) in &ranges {
        if a != data_len {
            let name = tensors.iter().find(|(_, t)| t.offsets == [a, b]).map_or("?", |(n, _)| n.as_str());
            return Err(bad(format!("entry '{name}' starts at {a}, expected {data_len} (gap or overlap)")));
        }
        data_len = b;
    }
    let end = data_start.checked_add(data_len);
    let fits = match item_at {
        None => end == Some(input.len()),
        Some(_) => end.is_some_and(|e| e <= input.len()),
    };
    if !fits {
        let end = end.map_or_else(|| "past 2^64".into(), |e| e.to_string());
        return Err(bad(format!("data ends at {end} but the file has {} bytes", input.len())));
    }
    Ok(Header { tensors, data_start, data_len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::ReadAt;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    fn input(bytes: Vec<u8>) -> Input {
        Input::new("t.safetensors", Box::new(bytes))
    }

    fn message(r: Result<Header>) -> String {
        r.expect_err("must be refused").to_string()
    }

    const TWO: &str = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}"#;

    #[test]
    fn a_valid_file_is_read_with_its_offsets() {
        let h = read_file(&input(file(TWO, 11))).unwrap();
        assert_eq!(h.data_start, 8 + TWO.len() as u64);
        assert_eq!(h.data_len, 11);
        assert_eq!(h.tensors["a"], TensorEntry { dtype: DType::U8, shape: vec![3], offsets: [8, 11] });
        assert_eq!(h.tensors.len(), 2);
    }

    #[test]
    fn an_item_is_read_at_its_offset_and_may_end_before_the_file() {
        let mut bytes = vec![7u8; 5];
        bytes.extend(file(TWO, 11));
        bytes.extend_from_slice(b"tail");
        let h = read_item(&input(bytes), 5).unwrap();
        assert_eq!(h.data_start, 5 + 8 + TWO.len() as u64);
        assert_eq!(h.data_len, 11);
    }

    #[test]
    fn each_defect_is_named() {
        let cases: &[(Vec<u8>, &str)] = &[
            (vec![1, 2, 3], "file is truncated: needs bytes 0..8"),
            (file(TWO, 11)[..40].to_vec(), "bad safetensors file: header length"),
            (file("{nope", 0), "bad safetensors file: header JSON:"),
            (file("[1]", 0), "bad safetensors file: header JSON: invalid type: sequence, expected an object of tensor"),
            (
                file(r#"{"x":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, 1),
                "header JSON: invalid value: integer",
            ),
            (
                file(
                    r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                    2,
                ),
                "a tensor name appears twice in the header",
            ),
            (file(r#"{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#, 1), "entry 'x' lacks a known dtype"),
            (file(r#"{"x":{"dtype":"F32","shape":[1]}}"#, 4), "entry 'x' lacks a known dtype, a shape or two"),
            (
                file(r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
                "offsets 0..8 do not hold a [3] F32",
            ),
            (file(r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, 8), "offsets 4..0 do not hold"),
            (
                file(r#"{"x":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, 0),
                "do not hold a [4294967296, 4294967296] U8",
            ),
            (
                file(
                    r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"y":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                    3,
                ),
                "entry 'y' starts at 1, expected 2 (gap or overlap)",
            ),
            (file(r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#, 4), "entry 'x' starts at 2, expected 0"),
            (file(TWO, 12), "bad safetensors file: data ends at"),
            (file(TWO, 10), "data ends at 157 but the file has 156 bytes"),
        ];
        for (bytes, want) in cases {
            let got = message(read_file(&input(bytes.clone())));
            assert!(got.starts_with("t.safetensors: "), "{got}");
            assert!(got.contains(want), "{got} lacks {want}");
        }
    }

    #[test]
    fn the_header_cap_is_a_limit() {
        let n = MAX_HEADER + 1;
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.resize(8 + n as usize, b' ');
        let e = read_file(&input(bytes)).unwrap_err();
        assert_eq!(e.label(), "limit");
        assert_eq!(e.file(), Some("t.safetensors"));
    }

    #[test]
    fn item_messages_say_where_the_item_is() {
        let mut bytes = vec![0u8; 3];
        bytes.extend(file(r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#, 1));
        assert!(message(read_item(&input(bytes), 3)).contains("bad safetensors item at byte 3: data ends at"));
        let mut bytes = vec![0u8; 3];
        bytes.extend(file("not json", 0));
        assert!(message(read_item(&input(bytes), 3)).contains("item at byte 3 is neither a torch.save zip nor"));
    }

    /// A header whose file is larger than 4 GiB, read without the data: the offsets are u64 on every target.
    struct Sparse {
        head: Vec<u8>,
        len: u64,
    }

    impl ReadAt for Sparse {
        fn len(&self) -> u64 {
            self.len
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = usize::try_from(offset + i as u64).ok().and_then(|j| self.head.get(j)).copied().unwrap_or(0);
            }
            Ok(())
        }
    }

    #[test]
    fn a_shard_over_4_gib_is_read() {
        let h = r#"{"w":{"dtype":"F32","shape":[1250000000],"data_offsets":[0,5000000000]}}"#;
        let head = file(h, 0);
        let len = head.len() as u64 + 5_000_000_000;
        let got = read_file(&Input::new("big.safetensors", Box::new(Sparse { head, len }))).unwrap();
        assert_eq!(got.data_len, 5_000_000_000);
    }

    /// The reference reader agrees: every case above, the fuzz corpus and a few valid files are accepted by
    /// both or refused by both, with the same entries when accepted. Our reader is stricter only on dtypes
    /// ckptconv cannot hold and on a `__metadata__` that is not a string map (which it skips, the crate refuses).
    #[test]
    fn the_safetensors_crate_agrees() {
        let mut cases: Vec<Vec<u8>> = vec![
            file(TWO, 11),
            file("{}", 0),
            file(
                r#"{"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]},"e":{"dtype":"I64","shape":[0,3],"data_offsets":[2,2]}}"#,
                2,
            ),
            file(TWO, 12),
            file(TWO, 10),
            file(r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#, 4),
            file(r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
            file(r#"{"x":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, 0),
            file("[1]", 0),
            file("{nope", 0),
            vec![1, 2, 3],
        ];
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/safetensors_header");
        for e in std::fs::read_dir(corpus).unwrap() {
            cases.push(std::fs::read(e.unwrap().path()).unwrap());
        }
        let mut compared = 0;
        for bytes in &cases {
            let theirs = safetensors::SafeTensors::read_metadata(bytes);
            let ours = read_file(&input(bytes.clone()));
            if let Ok((_, m)) = &theirs {
                let ours_only: Vec<_> = m.tensors().into_values().map(|i| format!("{:?}", i.dtype)).collect();
                if ours_only.iter().any(|d| DType::from_safetensors_name(d).is_none()) {
                    continue;
                }
            }
            if theirs.is_err() && ours.is_ok() {
                let h: serde_json::Value = serde_json::from_slice(&bytes[8..]).unwrap_or_default();
                let meta = h.get("__metadata__");
                if meta.is_some_and(|m| !m.as_object().is_some_and(|o| o.values().all(|v| v.is_string()))) {
                    continue;
                }
            }
            match (&theirs, &ours) {
                (Ok((n, m)), Ok(h)) => {
                    assert_eq!(h.data_start, 8 + *n as u64);
                    let got: BTreeMap<String, (String, Vec<u64>, [u64; 2])> = m
                        .tensors()
                        .into_iter()
                        .map(|(k, i)| {
                            let shape = i.shape.iter().map(|&d| d as u64).collect();
                            (k, (format!("{:?}", i.dtype), shape, [i.data_offsets.0 as u64, i.data_offsets.1 as u64]))
                        })
                        .collect();
                    let want: BTreeMap<String, (String, Vec<u64>, [u64; 2])> = h
                        .tensors
                        .iter()
                        .map(|(k, e)| (k.clone(), (e.dtype.safetensors_name().into(), e.shape.clone(), e.offsets)))
                        .collect();
                    assert_eq!(got, want);
                }
                (Err(_), Err(_)) => {}
                _ => panic!("disagree on {:?}: crate {theirs:?}, ours {ours:?}", &bytes[..bytes.len().min(200)]),
            }
            compared += 1;
        }
        assert!(compared >= 20, "only {compared} cases compared");
    }
}
