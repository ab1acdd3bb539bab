//! Strided views: a torch-style view (offset, shape, strides) over one storage in one input, read in row-major
//! order through a cached window of source bytes.

use super::fit;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::io::Input;

/// Largest window of source bytes cached for gathering non-contiguous views.
const WINDOW_BYTES: u64 = 32 << 20;

/// A torch-style view: `shape` and `strides` (in elements) over a storage at `data_start` in an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StridedView {
    /// Index of the input that holds the storage.
    pub input: usize,
    /// Absolute byte offset of storage element 0.
    pub data_start: u64,
    /// Storage length in bytes.
    pub storage_bytes: u64,
    /// Element type.
    pub dtype: DType,
    /// Offset of the view's first element, in elements.
    pub offset: u64,
    /// Logical shape.
    pub shape: Vec<u64>,
    /// Strides in elements.
    pub strides: Vec<u64>,
    numel: u64,
    contiguous: bool,
}

impl StridedView {
    /// Checks a view against its storage with overflow-safe arithmetic.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        input: usize,
        data_start: u64,
        storage_bytes: u64,
        dtype: DType,
        offset: u64,
        shape: Vec<u64>,
        strides: Vec<u64>,
        max_dims: usize,
    ) -> Result<Self> {
        if shape.len() > max_dims {
            return Err(tensor_err(name, format!("{} dimensions (at most {max_dims} allowed)", shape.len())));
        }
        if shape.len() != strides.len() {
            return Err(tensor_err(name, "shape and stride lengths differ"));
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tensor_err(name, format!("shape {shape:?} overflows")))?;
        let esz = dtype.size() as u64;
        numel.checked_mul(esz).ok_or_else(|| tensor_err(name, format!("shape {shape:?} overflows")))?;
        if numel > 0 {
            let last = shape
                .iter()
                .zip(&strides)
                .try_fold(offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
            let end = last
                .and_then(|l| l.checked_add(1))
                .and_then(|n| n.checked_mul(esz))
                .ok_or_else(|| tensor_err(name, "view extent overflows"))?;
            if end > storage_bytes {
                return Err(tensor_err(
                    name,
                    format!(
                        "view (offset {offset}, shape {shape:?}, strides {strides:?}) reaches byte {end} of a {storage_bytes}-byte storage"
                    ),
                ));
            }
        }
        let mut expect = 1u64;
        let mut contiguous = true;
        for (&d, &s) in shape.iter().zip(&strides).rev() {
            if d != 1 && s != expect {
                contiguous = false;
            }
            expect = expect.saturating_mul(d);
        }
        Ok(StridedView { input, data_start, storage_bytes, dtype, offset, shape, strides, numel, contiguous })
    }

    /// A whole contiguous tensor of `shape` stored at `data_start` (a safetensors entry).
    pub fn whole(name: &str, input: usize, data_start: u64, bytes: u64, dtype: DType, shape: Vec<u64>) -> Result<Self> {
        let strides = contiguous_strides(&shape);
        StridedView::new(name, input, data_start, bytes, dtype, 0, shape, strides, 64)
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.numel
    }

    /// Row `i` of dimension 0, without that dimension (one layer of a stacked `[layers, ...]` tensor).
    pub fn layer(&self, name: &str, i: u64) -> Result<StridedView> {
        let row = self.rows(name, i, i + 1)?;
        StridedView::new(
            name,
            row.input,
            row.data_start,
            row.storage_bytes,
            row.dtype,
            row.offset,
            row.shape[1..].to_vec(),
            row.strides[1..].to_vec(),
            usize::MAX,
        )
    }

    /// Block `j` of `n` stacked `[rows, cols]` blocks of a contiguous view's elements, transposed to
    /// `[cols, rows]` (how Megatron's legacy GroupedMLP stacks its experts' weights).
    pub fn block_t(&self, name: &str, n: u64, j: u64, (rows, cols): (u64, u64)) -> Result<StridedView> {
        let per = rows.checked_mul(cols).unwrap_or(0);
        if !self.contiguous || j >= n || per == 0 || per.checked_mul(n) != Some(self.numel) {
            let msg = format!("{:?} is not {n} stacked blocks of [{rows}, {cols}]", self.shape);
            return Err(tensor_err(name, msg));
        }
        let offset = j.checked_mul(per).and_then(|x| x.checked_add(self.offset));
        let offset = offset.ok_or_else(|| tensor_err(name, "block offset overflows"))?;
        let (shape, strides) = (vec![cols, rows], vec![1, cols]);
        StridedView::new(name, self.input, self.data_start, self.storage_bytes, self.dtype, offset, shape, strides, 2)
    }

    /// The sub-view of rows `[a, b)` of dimension 0.
    pub fn rows(&self, name: &str, a: u64, b: u64) -> Result<StridedView> {
        let Some(&n) = self.shape.first() else {
            return Err(tensor_err(name, "a 0-d tensor has no rows"));
        };
        if a > b || b > n {
            return Err(tensor_err(name, format!("rows {a}..{b} of a tensor with {n}")));
        }
        let mut shape = self.shape.clone();
        shape[0] = b - a;
        let offset = a.checked_mul(self.strides[0]).and_then(|x| x.checked_add(self.offset));
        let offset = offset.ok_or_else(|| tensor_err(name, "row offset overflows"))?;
        StridedView::new(
            name,
            self.input,
            self.data_start,
            self.storage_bytes,
            self.dtype,
            offset,
            shape,
            self.strides.clone(),
            usize::MAX,
        )
    }

    /// Whether the view's elements are one contiguous run of its storage.
    pub fn is_contiguous(&self) -> bool {
        self.contiguous
    }

    /// Reads elements `[start, start + count)` in row-major order into `out` (`count * esize` bytes).
    pub(crate) fn read(
        &self,
        inputs: &[Input],
        start: u64,
        count: u64,
        out: &mut [u8],
        window: &mut Window,
    ) -> Result<()> {
        let input = inputs
            .get(self.input)
            .ok_or_else(|| Error::new(ErrorKind::Output(format!("plan refers to missing input {}", self.input))))?;
        let esz = self.dtype.size() as u64;
        if count == 0 {
            return Ok(());
        }
        if self.contiguous {
            let at = self.data_start + (self.offset + start) * esz;
            return input.read_exact_at(at, out);
        }
        if let Some(done) = self.read_transposed(input, start, count, out, window)? {
            return Ok(done);
        }
        // General views: walk the innermost dimension run by run, through a cached source window.
        let ndim = self.shape.len();
        let inner = ndim - 1;
        let mut idx = vec![0u64; ndim];
        let mut rem = start;
        for d in (0..ndim).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        let e = esz as usize;
        let mut done = 0u64;
        while done < count {
            let run = (self.shape[inner] - idx[inner]).min(count - done);
            let base: u64 = self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<u64>();
            let s_in = self.strides[inner];
            let first = self.data_start + base * esz;
            let span = ((run - 1) * s_in + 1) * esz;
            let dst = &mut out[(done * esz) as usize..((done + run) * esz) as usize];
            if span <= WINDOW_BYTES {
                let src = window.get(input, self.input, first, span, self.data_start + self.storage_bytes)?;
                if s_in == 1 {
                    dst.copy_from_slice(src);
                } else {
                    let step = (s_in * esz) as usize;
                    for (k, o) in dst.chunks_exact_mut(e).enumerate() {
                        o.copy_from_slice(&src[k * step..k * step + e]);
                    }
                }
            } else {
                for (k, o) in dst.chunks_exact_mut(e).enumerate() {
                    let at = first + k as u64 * s_in * esz;
                    let src = window.get(input, self.input, at, esz, self.data_start + self.storage_bytes)?;
                    o.copy_from_slice(src);
                }
            }
            done += run;
            idx[inner] += run;
            for d in (1..ndim).rev() {
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
                idx[d - 1] += 1;
            }
        }
        Ok(())
    }
}

impl StridedView {
    /// A transposed matrix (2-d, unit stride on dim 0) read in source order: for each source row, the run of
    /// output rows in the band is contiguous in the storage, so a band costs one window pass over the source
    /// instead of one window load per element. Handles whole output rows; `None` leaves the rest to the
    /// general path.
    fn read_transposed(
        &self,
        input: &Input,
        start: u64,
        count: u64,
        out: &mut [u8],
        window: &mut Window,
    ) -> Result<Option<()>> {
        let ([n0, n1], [s0, s1]) = (self.shape.as_slice(), self.strides.as_slice()) else { return Ok(None) };
        let (n0, n1, s0, s1) = (*n0, *n1, *s0, *s1);
        if s0 != 1 || s1 <= 1 || n1 < 2 || !start.is_multiple_of(n1) || !count.is_multiple_of(n1) {
            return Ok(None);
        }
        let esz = self.dtype.size() as u64;
        let (ra, rb) = (start / n1, (start + count) / n1);
        let run = (rb - ra) * esz;
        if rb > n0 || run > WINDOW_BYTES {
            return Ok(None);
        }
        let e = esz as usize;
        let limit = self.data_start + self.storage_bytes;
        for j in 0..n1 {
            let at = self.data_start + (self.offset + ra * s0 + j * s1) * esz;
            let src = window.get(input, self.input, at, run, limit)?;
            for (i, chunk) in src.chunks_exact(e).enumerate() {
                let o = ((i as u64 * n1 + j) * esz) as usize;
                out[o..o + e].copy_from_slice(chunk);
            }
        }
        Ok(Some(()))
    }
}

/// A cache of one source byte range, reused across runs and bands of a non-contiguous view.
#[derive(Default)]
pub struct Window {
    input: usize,
    start: u64,
    buf: Vec<u8>,
}

impl Window {
    fn get(&mut self, input: &Input, input_index: usize, at: u64, len: u64, limit: u64) -> Result<&[u8]> {
        let hit = self.input == input_index
            && at >= self.start
            && at + len <= self.start + self.buf.len() as u64
            && !self.buf.is_empty();
        if !hit {
            let want = WINDOW_BYTES.min(limit.saturating_sub(at)).max(len);
            fit(&mut self.buf, want as usize);
            input.read_exact_at(at, &mut self.buf)?;
            self.input = input_index;
            self.start = at;
        }
        let off = (at - self.start) as usize;
        Ok(&self.buf[off..off + len as usize])
    }
}

/// Row-major strides of `shape`, in elements.
pub fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1].saturating_mul(shape[d + 1]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(storage: &[u8], dtype: DType, offset: u64, shape: &[u64], strides: &[u64]) -> (Vec<Input>, StridedView) {
        let inputs = vec![Input::new("mem", Box::new(storage.to_vec()))];
        let v = StridedView::new("t", 0, 0, storage.len() as u64, dtype, offset, shape.to_vec(), strides.to_vec(), 64)
            .unwrap();
        (inputs, v)
    }

    #[test]
    fn transposed_view_reads_row_major() {
        // storage 2x3 u8 [[0,1,2],[3,4,5]]; its transpose is 3x2 with strides (1, 3).
        let (inputs, v) = view(&[0, 1, 2, 3, 4, 5], DType::U8, 0, &[3, 2], &[1, 3]);
        assert!(!v.is_contiguous());
        let mut out = vec![0u8; 6];
        v.read(&inputs, 0, 6, &mut out, &mut Window::default()).unwrap();
        assert_eq!(out, [0, 3, 1, 4, 2, 5]);
        // A band that starts mid-row.
        let mut out = vec![0u8; 3];
        v.read(&inputs, 3, 3, &mut out, &mut Window::default()).unwrap();
        assert_eq!(out, [4, 2, 5]);
    }

    #[test]
    fn sliced_view_with_offset() {
        let data: Vec<u8> = (0..20).collect();
        // x.view(4,5)[1:3, 1:4] -> offset 6, shape (2,3), strides (5,1)
        let (inputs, v) = view(&data, DType::U8, 6, &[2, 3], &[5, 1]);
        let mut out = vec![0u8; 6];
        v.read(&inputs, 0, 6, &mut out, &mut Window::default()).unwrap();
        assert_eq!(out, [6, 7, 8, 11, 12, 13]);
    }

    #[test]
    fn view_past_storage_is_refused() {
        let e = StridedView::new("w", 0, 0, 16, DType::F32, 1, vec![4], vec![1], 64).unwrap_err();
        assert!(e.to_string().contains("reaches byte 20"), "{e}");
        let e = StridedView::new("w", 0, 0, 16, DType::F32, 0, vec![u64::MAX, 2], vec![1, 1], 64).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }

    #[test]
    fn empty_and_scalar_views() {
        let v = StridedView::new("e", 0, 0, 0, DType::F32, 0, vec![3, 0], vec![0, 1], 64).unwrap();
        assert_eq!(v.numel(), 0);
        let (inputs, s) = view(&7f32.to_le_bytes(), DType::F32, 0, &[], &[]);
        assert!(s.is_contiguous());
        let mut out = vec![0u8; 4];
        s.read(&inputs, 0, 1, &mut out, &mut Window::default()).unwrap();
        assert_eq!(f32::from_le_bytes(out.try_into().unwrap()), 7.0);
    }
}
