//! Just enough of the zip format to find torch.save entries: the central directory (with zip64), stored and
//! deflated entries, data located through each local header. Deflated entries are inflated by
//! [`super::inflate`]; every other compression method is refused.

use crate::error::{Error, ErrorKind, Result};
use crate::io::{Input, ReadAt};
use crate::planned::{MAX_EXPANSION, expansion_limit};
use std::collections::HashMap;

/// Compression method 0: the entry's bytes are stored as they are (torch.save writes only these).
pub const STORED: u16 = 0;
/// Compression method 8: deflate (what Python's `zipfile.ZIP_DEFLATED` writes).
pub const DEFLATED: u16 = 8;
/// What a deflated entry may inflate to beyond [`MAX_EXPANSION`] times its compressed bytes: room for the tensors
/// that deflate a thousandfold (an all-zero LoRA B or bias, a causal mask buffer) without letting a small file
/// inflate to gigabytes.
pub const INFLATE_ALLOWANCE: u64 = 64 << 20;

/// One entry's name, compression and the byte range of its data in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipEntry {
    /// Entry name as written in the central directory.
    pub name: String,
    /// Absolute offset of the entry's first data byte (its compressed bytes when deflated); 0 until located.
    pub data_start: u64,
    /// Length of the entry's content in bytes (inflated, when deflated).
    pub size: u64,
    /// [`STORED`] or [`DEFLATED`].
    pub method: u16,
    /// Bytes the entry takes in the file (equal to `size` when stored).
    pub compressed: u64,
    /// CRC-32 of the content, from the central directory.
    pub crc: u32,
    /// Where a deflated entry's inflated bytes are read in its input (past the end of the file: see
    /// [`super::inflate::Inflated`]); `None` for stored entries and for deflated ones that no reader inflates.
    pub inflated_at: Option<u64>,
    pub(crate) local_header: u64,
}

impl ZipEntry {
    /// Whether the entry is deflated.
    pub fn is_deflated(&self) -> bool {
        self.method == DEFLATED
    }

    /// Where the entry's content can be read in its input: its data when stored, its inflated bytes when deflated
    /// (`None` for a deflated entry of a zip that no reader inflates).
    pub fn content_start(&self) -> Option<u64> {
        if self.is_deflated() { self.inflated_at } else { Some(self.data_start) }
    }
}

/// The entries of a zip file, by name.
#[derive(Debug, Clone)]
pub struct ZipIndex {
    entries: Vec<ZipEntry>,
    /// Entry index by name in ASCII lower case, as torch's reader looks names up.
    by_name: HashMap<String, usize>,
    /// Absolute end of the zip inside its file.
    end: u64,
}

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CDIR_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// A central directory larger than this is not a checkpoint (10,000 tensors need about 1 MiB).
const MAX_CDIR: u64 = 64 << 20;

fn zerr(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Zip(msg.into()))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| zerr(format!("record cut short at byte {at}")))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| zerr(format!("record cut short at byte {at}")))
}
fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
        .ok_or_else(|| zerr(format!("record cut short at byte {at}")))
}

impl ZipIndex {
    /// Reads the central directory of `input` and locates every entry's data.
    pub fn read(input: &Input) -> Result<ZipIndex> {
        Self::read_range(input, 0, input.len())
    }

    /// Reads a zip stored at `[base, base + len)` of `input` (DCP items are whole zips inside a file).
    /// Offsets inside the zip count from `base`; the index reports absolute ones.
    pub fn read_range(input: &Input, base: u64, len: u64) -> Result<ZipIndex> {
        let end = base.checked_add(len).filter(|&e| e <= input.len()).ok_or_else(|| {
            Error::new(ErrorKind::Truncated(format!(
                "zip at {base}+{len} runs past the end of the {}-byte file",
                input.len()
            )))
        });
        end.and_then(|_| Self::read_inner(input, base, len)).map_err(|e| e.in_file(&input.name))
    }

    /// The central directory's checklist in file order (end record, zip64 locator and record, then each entry),
    /// each step reading what the one before found; kept as one function so the order of checks is the code's order.
    fn read_inner(input: &Input, base: u64, len: u64) -> Result<ZipIndex> {
        // A file that starts like a zip (a local header) but has no end record was cut short.
        let starts_like_zip = len >= 4 && u32_at(&input.read_vec(base, 4)?, 0)? == LOCAL_SIG;
        let cut = |what: String| {
            if starts_like_zip {
                Error::new(ErrorKind::Truncated(format!("a zip (it starts with a local header) without {what}")))
            } else {
                zerr(format!("{what}: the file is not a zip"))
            }
        };
        if len < 22 {
            return Err(cut(format!("room for an end record ({len} bytes)")));
        }
        // torch writes no zip comment, so a short tail almost always holds the end record.
        let find = |tail_len: u64| -> Result<Option<(Vec<u8>, u64, usize)>> {
            let tail_start = len - tail_len;
            let tail = input.read_vec(base + tail_start, tail_len)?;
            let pos = (0..=tail.len() - 22).rev().find(|&i| u32_at(&tail, i).ok() == Some(EOCD_SIG));
            Ok(pos.map(|p| (tail, tail_start, p)))
        };
        let found = match find(len.min(1024))? {
            Some(f) => Some(f),
            None if len > 1024 => find(len.min(22 + 65535))?,
            None => None,
        };
        let (tail, tail_start, eocd) = found.ok_or_else(|| cut("an end-of-central-directory record".into()))?;
        let rec = &tail[eocd..];
        // torch.save ends the file with the end record. Bytes after it (and its comment) are a second file
        // appended (fickling's polyglots append a legacy pickle or tar to a zip): refused, as nothing reads them.
        let eocd_abs = tail_start + eocd as u64;
        let record_end = eocd_abs + 22 + u16_at(rec, 20)? as u64;
        if record_end > len {
            return Err(zerr(format!(
                "the comment of the end record at byte {eocd_abs} runs past the end of the file"
            )));
        }
        if record_end != len {
            return Err(zerr(format!(
                "{} bytes after the zip's end record at byte {eocd_abs}; torch.save writes nothing after it \
                 (another file appended to the zip?)",
                len - record_end
            )));
        }
        let mut count = u16_at(rec, 10)? as u64;
        let mut cd_size = u32_at(rec, 12)? as u64;
        let mut cd_offset = u32_at(rec, 16)? as u64;
        let mut cd_limit = eocd_abs;
        let saturated = count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF;
        // torch.save always writes a zip64 locator and end record, and torch's reader (miniz) trusts them over the
        // 32-bit record, so they are read whenever present: a lying zip64 record must not convert here when torch
        // itself refuses the file.
        let loc = match eocd_abs.checked_sub(20) {
            Some(loc_abs) => Some((loc_abs, input.read_vec(base + loc_abs, 20)?)),
            None => None,
        };
        match loc.filter(|(_, l)| u32_at(l, 0).ok() == Some(ZIP64_LOCATOR_SIG)) {
            Some((loc_abs, loc)) => {
                let z64_abs = u64_at(&loc, 8)?;
                if z64_abs.checked_add(56).is_none_or(|e| e > loc_abs) {
                    return Err(zerr(format!("zip64 end record offset {z64_abs} lies outside the file")));
                }
                // miniz (torch) follows the locator's offset; Python's zipfile takes the 56 bytes before the
                // locator. torch.save writes the record right there, so both find the same one.
                if z64_abs + 56 != loc_abs {
                    return Err(zerr(format!(
                        "the zip64 end record at byte {z64_abs} does not end where its locator begins (byte \
                         {loc_abs}); zip readers would disagree on which record to read"
                    )));
                }
                let z = input.read_vec(base + z64_abs, 56)?;
                if u32_at(&z, 0)? != ZIP64_EOCD_SIG {
                    return Err(zerr(format!("no zip64 end record at offset {z64_abs}")));
                }
                let (count64, size64, offset64) = (u64_at(&z, 32)?, u64_at(&z, 40)?, u64_at(&z, 48)?);
                for (what, short, long, sat) in [
                    ("entry count", count, count64, 0xFFFF),
                    ("central directory size", cd_size, size64, 0xFFFF_FFFF),
                    ("central directory offset", cd_offset, offset64, 0xFFFF_FFFF),
                ] {
                    if short != sat && short != long {
                        return Err(zerr(format!(
                            "the zip64 end record gives {what} {long} but the end record gives {short}"
                        )));
                    }
                }
                (count, cd_size, cd_offset) = (count64, size64, offset64);
                cd_limit = z64_abs;
            }
            None if saturated => return Err(zerr("zip64 fields without a zip64 locator")),
            None => {}
        }
        let cd_end = cd_offset
            .checked_add(cd_size)
            .filter(|&e| e <= cd_limit)
            .ok_or_else(|| zerr(format!("central directory {cd_offset}+{cd_size} lies outside the file")))?;
        // miniz reads the directory at its recorded offset; Python's zipfile, right before the end records. torch.save
        // writes it there, so both read the same entries.
        if cd_end != cd_limit {
            return Err(zerr(format!(
                "the central directory ends at byte {cd_end} but the end records begin at byte {cd_limit}; zip \
                 readers would disagree on which entries the archive holds"
            )));
        }
        if cd_size > MAX_CDIR {
            return Err(Error::new(ErrorKind::Limit(format!("central directory of {cd_size} bytes"))));
        }
        if count > cd_size / 46 {
            return Err(zerr(format!("{count} entries cannot fit in a {cd_size}-byte central directory")));
        }
        let cd = input.read_vec(base + cd_offset, cd_end - cd_offset)?;
        let mut entries = Vec::with_capacity(count as usize);
        let mut by_name = HashMap::with_capacity(count as usize);
        let mut at = 0usize;
        for _ in 0..count {
            let e = parse_cdir_record(&cd, &mut at, cd_offset)?;
            // torch's zip reader (miniz, as torch calls it) matches names without regard to ASCII case, so two
            // names that differ only in case would be one entry to torch and two here.
            if let Some(&other) = by_name.get(&e.name.to_ascii_lowercase()) {
                let first: &ZipEntry = &entries[other];
                return Err(zerr(if first.name == e.name {
                    format!("entry '{}' appears twice", e.name)
                } else {
                    format!(
                        "entries '{}' and '{}' differ only in case; torch's zip reader takes them for one",
                        first.name, e.name
                    )
                }));
            }
            by_name.insert(e.name.to_ascii_lowercase(), entries.len());
            entries.push(e);
        }
        // Entries must lie before the directory and must not overlap one another.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].local_header);
        let mut prev_end = 0u64;
        for &i in &order {
            let e = &entries[i];
            if e.local_header < prev_end {
                return Err(zerr(format!("entry '{}' overlaps the entry before it", e.name)));
            }
            // 30 bytes of fixed local header at least precede the data.
            prev_end = e
                .local_header
                .checked_add(30)
                .and_then(|v| v.checked_add(e.compressed))
                .filter(|&v| v <= cd_offset)
                .ok_or_else(|| zerr(format!("entry '{}' runs past the central directory", e.name)))?;
        }
        for e in &mut entries {
            e.local_header += base;
        }
        Ok(ZipIndex { entries, by_name, end: base + len })
    }

    /// Where the fixed part of each local header of the entries named `prefix…` is, as `(offset, len)` ranges:
    /// what [`ZipIndex::locate`] reads for them.
    pub fn local_headers_under(&self, prefix: &str) -> Vec<(u64, u64)> {
        let prefix = prefix.to_ascii_lowercase();
        let mut ranges: Vec<(u64, u64)> = (self.entries.iter())
            .filter(|e| e.name.to_ascii_lowercase().starts_with(&prefix))
            .map(|e| (e.local_header, LOCAL_FIXED))
            .collect();
        ranges.sort_unstable();
        ranges
    }

    /// Every entry, in central-directory order (data not yet located).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// Locates the data of entry `name` by reading its local header. A deflated entry must not declare more than
    /// [`MAX_EXPANSION`] times its compressed bytes plus [`INFLATE_ALLOWANCE`] (checked here, before anything is
    /// inflated; whether it inflates to exactly what it declares is checked as it is inflated).
    pub fn locate(&self, input: &Input, name: &str) -> Result<Option<ZipEntry>> {
        let Some(&i) = self.by_name.get(&name.to_ascii_lowercase()) else {
            return Ok(None);
        };
        let mut e = self.entries[i].clone();
        e.data_start = local_data_start(&*input.data, e.local_header, name).map_err(|err| err.in_file(&input.name))?;
        if e.data_start.checked_add(e.compressed).is_none_or(|end| end > self.end) {
            return Err(Error::new(ErrorKind::Truncated(format!(
                "entry '{name}' needs bytes {}..{} but the archive ends at {}",
                e.data_start,
                e.data_start.saturating_add(e.compressed),
                self.end
            )))
            .in_file(&input.name));
        }
        if e.is_deflated() && e.size > expansion_limit(e.compressed, INFLATE_ALLOWANCE) {
            return Err(Error::new(ErrorKind::Limit(format!(
                "deflated entry '{name}' declares {} bytes inflated from {} ({}x): a deflated entry may inflate to at \
                 most {MAX_EXPANSION} times its compressed bytes plus {} MiB (a zip bomb?)",
                e.size,
                e.compressed,
                e.size / e.compressed.max(1),
                INFLATE_ALLOWANCE >> 20
            )))
            .in_file(&input.name));
        }
        Ok(Some(e))
    }

    /// Gives every deflated entry its place in an input of `from` bytes: each one's inflated bytes follow the
    /// previous one's, from offset `from` on. Returns the placed entries (not yet located) and where the last ends.
    pub(crate) fn place_deflated(&mut self, from: u64) -> Result<(Vec<ZipEntry>, u64)> {
        let mut at = from;
        let mut placed = Vec::new();
        for e in self.entries.iter_mut().filter(|e| e.is_deflated()) {
            e.inflated_at = Some(at);
            at = at.checked_add(e.size).ok_or_else(|| {
                zerr(format!("the deflated entries declare more than 2^64 bytes together (entry '{}')", e.name))
            })?;
            placed.push(e.clone());
        }
        Ok((placed, at))
    }
}

/// The fixed part of a local header, before its name and extra field.
const LOCAL_FIXED: u64 = 30;

/// Where the data of the entry whose local header is at `local_header` starts: after the 30-byte fixed header,
/// the name and the extra field, whose lengths the local header gives.
pub(crate) fn local_data_start(data: &dyn ReadAt, local_header: u64, name: &str) -> Result<u64> {
    let mut h = [0u8; LOCAL_FIXED as usize];
    if local_header.checked_add(LOCAL_FIXED).is_none_or(|end| end > data.len()) {
        return Err(Error::new(ErrorKind::Truncated(format!(
            "entry '{name}' has its local header at {local_header} but the file has {} bytes",
            data.len()
        ))));
    }
    data.read_at(local_header, &mut h)
        .map_err(|err| Error::new(ErrorKind::Io(format!("read at {local_header}: {err}"))))?;
    if u32_at(&h, 0)? != LOCAL_SIG {
        return Err(zerr(format!("entry '{name}' has no local header at offset {local_header}")));
    }
    Ok(local_header + LOCAL_FIXED + u16_at(&h, 26)? as u64 + u16_at(&h, 28)? as u64)
}

fn parse_cdir_record(cd: &[u8], at: &mut usize, cd_offset: u64) -> Result<ZipEntry> {
    let base = *at;
    if u32_at(cd, base)? != CDIR_SIG {
        return Err(zerr(format!("bad central directory record at offset {}", cd_offset + base as u64)));
    }
    let flags = u16_at(cd, base + 8)?;
    let method = u16_at(cd, base + 10)?;
    let crc = u32_at(cd, base + 16)?;
    let mut comp = u32_at(cd, base + 20)? as u64;
    let mut size = u32_at(cd, base + 24)? as u64;
    let name_len = u16_at(cd, base + 28)? as usize;
    let extra_len = u16_at(cd, base + 30)? as usize;
    let comment_len = u16_at(cd, base + 32)? as usize;
    let mut local = u32_at(cd, base + 42)? as u64;
    let name_start = base + 46;
    let name_bytes =
        cd.get(name_start..name_start + name_len).ok_or_else(|| zerr("central directory record cut short"))?;
    let name = String::from_utf8(name_bytes.to_vec()).map_err(|_| {
        zerr(format!(
            "the name of the entry at central-directory offset {} is not UTF-8 ('{}')",
            cd_offset + base as u64,
            String::from_utf8_lossy(name_bytes).escape_debug()
        ))
    })?;
    let extra = cd
        .get(name_start + name_len..name_start + name_len + extra_len)
        .ok_or_else(|| zerr("central directory record cut short"))?;
    // zip64 extended information: only the fields saturated in the record are present, in this order.
    let mut x = 0usize;
    while x + 4 <= extra.len() {
        let id = u16_at(extra, x)?;
        let n = u16_at(extra, x + 2)? as usize;
        let body = extra.get(x + 4..x + 4 + n).ok_or_else(|| zerr(format!("entry '{name}': extra field cut short")))?;
        if id == 0x0001 {
            let mut f = 0usize;
            for slot in [&mut size, &mut comp, &mut local] {
                if *slot == 0xFFFF_FFFF {
                    *slot = u64_at(body, f).map_err(|_| zerr(format!("entry '{name}': zip64 field missing")))?;
                    f += 8;
                }
            }
        }
        x += 4 + n;
    }
    if method != STORED && method != DEFLATED {
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "zip entry '{name}' is compressed with method {method}; only stored (0) and deflated (8) entries are read"
        ))));
    }
    if flags & 1 != 0 {
        return Err(Error::new(ErrorKind::Unsupported(format!("zip entry '{name}' is encrypted"))));
    }
    if method == STORED && comp != size {
        return Err(zerr(format!("stored entry '{name}' has compressed size {comp} but size {size}")));
    }
    *at = name_start + name_len + extra_len + comment_len;
    Ok(ZipEntry { name, data_start: 0, size, method, compressed: comp, crc, inflated_at: None, local_header: local })
}
