//! FP8 weights with their scales, dequantized per band of rows as DeepSeek-V3's reference `weight_dequant`
//! computes them: each element widened to f32, multiplied by its block's f32 scale, then rounded once to the
//! output type (round to nearest even, as storing into a bf16 tensor does).

use super::{ChunkBuffers, Source, fit};
use crate::dtype::{self, DType};
use crate::error::{Result, tensor_err};
use crate::io::Input;

/// A `[rows, cols]` FP8 weight times its scale grid: block `(i, j)` of `block.0 × block.1` elements (edge blocks
/// smaller) is multiplied by `scale[i, j]`; a single scale (`block` = the whole tensor) is per-tensor scaling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDequant {
    /// The FP8 weight.
    pub weight: Source,
    /// The scales, `[ceil(rows / block.0), ceil(cols / block.1)]` (f32, bf16 or f16).
    pub scale: Source,
    /// Rows of the weight.
    pub rows: u64,
    /// Columns of the weight.
    pub cols: u64,
    /// Rows and columns of one block.
    pub block: (u64, u64),
    /// Output element type.
    pub out: DType,
}

/// Every FP8 byte's value, by bit pattern (e4m3fn: bias 7, no infinities, S.1111.111 is NaN); built once.
fn e4m3fn_table() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(e4m3fn_values)
}

fn e4m3fn_values() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (b, v) in t.iter_mut().enumerate() {
        let (sign, exp, man) = (b >> 7, (b >> 3) & 0xF, b & 0x7);
        let mag = match (exp, man) {
            (0xF, 0x7) => f32::NAN,
            (0, m) => m as f32 / 8.0 * 2f32.powi(-6),
            (e, m) => (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7),
        };
        *v = if sign == 1 { -mag } else { mag };
    }
    t
}

/// e5m2 is the top byte of an IEEE half; built once.
fn e5m2_table() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(e5m2_values)
}

fn e5m2_values() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (b, v) in t.iter_mut().enumerate() {
        *v = half::f16::from_bits((b as u16) << 8).to_f32();
    }
    t
}

impl BlockDequant {
    /// Checks the scale grid against the weight and the block size.
    pub fn new(
        name: &str,
        weight: Source,
        scale: Source,
        shape: &[u64],
        block: (u64, u64),
        out: DType,
    ) -> Result<Self> {
        let [rows, cols] = shape[..] else {
            return Err(tensor_err(
                name,
                format!("an FP8 weight of shape {shape:?}: only 2-D weights are dequantized"),
            ));
        };
        let per_tensor = scale.numel() == 1;
        let block = if per_tensor { (rows.max(1), cols.max(1)) } else { block };
        let grid = (rows.div_ceil(block.0), cols.div_ceil(block.1));
        if !per_tensor && scale.numel() != grid.0 * grid.1 {
            return Err(tensor_err(
                name,
                format!(
                    "its scale has {} elements, but a [{rows}, {cols}] weight in {}x{} blocks needs a [{}, {}] grid",
                    scale.numel(),
                    block.0,
                    block.1,
                    grid.0,
                    grid.1
                ),
            ));
        }
        if !scale.dtype().is_castable_float() {
            return Err(tensor_err(name, format!("its scale is {}, not a float type", scale.dtype().torch_name())));
        }
        Ok(BlockDequant { weight, scale, rows, cols, block, out })
    }

    /// Elements `[start, start + count)` (whole rows) of the dequantized weight, as `out` elements.
    pub(super) fn read(
        &self,
        inputs: &[Input],
        start: u64,
        count: u64,
        out: &mut [u8],
        bufs: &mut ChunkBuffers,
    ) -> Result<()> {
        let cols = self.cols.max(1);
        let (r0, r1) = (start / cols, (start + count).div_ceil(cols));
        // The band's FP8 bytes, then the scale rows its block rows use.
        let mut raw = std::mem::take(&mut bufs.deq_raw);
        fit(&mut raw, count as usize);
        let got = self.weight.read(inputs, start, count, &mut raw, bufs);
        let grid_cols = cols.div_ceil(self.block.1);
        let per_tensor = self.scale.numel() == 1;
        let (s0, s1) = if per_tensor { (0, 1) } else { (r0 / self.block.0, r1.div_ceil(self.block.0)) };
        let n_scales = if per_tensor { 1 } else { (s1 - s0) * grid_cols };
        let mut scale_raw = std::mem::take(&mut bufs.deq_scale);
        fit(&mut scale_raw, (n_scales * self.scale.dtype().size() as u64) as usize);
        let got = got.and_then(|_| self.scale.read(inputs, s0 * grid_cols, n_scales, &mut scale_raw, bufs));
        if let Err(e) = got {
            bufs.deq_raw = raw;
            bufs.deq_scale = scale_raw;
            return Err(e);
        }
        let mut scales = vec![0f32; n_scales as usize]; // a few per band
        dtype::widen_to_f32(self.scale.dtype(), &scale_raw, &mut scales);
        let table = if self.weight.dtype() == DType::F8E5M2 { e5m2_table() } else { e4m3fn_table() };
        // A block's elements take at most 256 values: round (value × scale) once per FP8 byte value, into a table
        // of output bytes, and look each element up. Same multiply, same rounding, same bits as element by element.
        let size = self.out.size();
        let bw = self.block.1.min(cols) as usize;
        let n_tables = if per_tensor { 1 } else { grid_cols as usize };
        let mut scaled = std::mem::take(&mut bufs.deq_values);
        scaled.clear();
        scaled.resize(256, 0.0);
        let mut tables = std::mem::take(&mut bufs.deq_tables);
        fit(&mut tables, n_tables * 256 * size);
        let mut built_for = u64::MAX;
        for (k, (row, out_row)) in raw.chunks(cols as usize).zip(out.chunks_mut(cols as usize * size)).enumerate() {
            let srow = if per_tensor { 0 } else { (r0 + k as u64) / self.block.0 - s0 };
            if srow != built_for {
                for (j, t) in tables.chunks_exact_mut(256 * size).enumerate() {
                    let s = scales[srow as usize * n_tables + j];
                    for (d, &v) in scaled.iter_mut().zip(table.iter()) {
                        *d = v * s;
                    }
                    dtype::narrow_from_f32(&scaled, self.out, t);
                }
                built_for = srow;
            }
            match size {
                2 => look_up::<2>(row, out_row, &tables, bw),
                4 => look_up::<4>(row, out_row, &tables, bw),
                _ => look_up_any(row, out_row, &tables, bw, size),
            }
        }
        bufs.deq_values = scaled;
        bufs.deq_tables = tables;
        bufs.deq_raw = raw;
        bufs.deq_scale = scale_raw;
        Ok(())
    }
}

/// One row: each run of `bw` FP8 bytes through its block's table of `N`-byte outputs.
#[inline(always)]
fn look_up<const N: usize>(row: &[u8], out: &mut [u8], tables: &[u8], bw: usize) {
    for ((bytes, outs), t) in row.chunks(bw).zip(out.chunks_mut(bw * N)).zip(tables.chunks_exact(256 * N)) {
        for (&b, o) in bytes.iter().zip(outs.chunks_exact_mut(N)) {
            let at = b as usize * N;
            o.copy_from_slice(&t[at..at + N]);
        }
    }
}

fn look_up_any(row: &[u8], out: &mut [u8], tables: &[u8], bw: usize, size: usize) {
    for ((bytes, outs), t) in row.chunks(bw).zip(out.chunks_mut(bw * size)).zip(tables.chunks_exact(256 * size)) {
        for (&b, o) in bytes.iter().zip(outs.chunks_exact_mut(size)) {
            let at = b as usize * size;
            o.copy_from_slice(&t[at..at + size]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::plan::view::StridedView;

    /// The reference: every element widened, times its block's scale, rounded once (weight_dequant).
    fn reference(w: &[u8], scales: &[f32], rows: usize, cols: usize, block: (usize, usize), out: DType) -> Vec<u8> {
        let grid_cols = cols.div_ceil(block.1);
        let values: Vec<f32> = (0..rows * cols)
            .map(|k| {
                let (r, c) = (k / cols, k % cols);
                let s = if scales.len() == 1 { scales[0] } else { scales[(r / block.0) * grid_cols + c / block.1] };
                e4m3fn_values()[w[k] as usize] * s
            })
            .collect();
        let mut bytes = vec![0u8; values.len() * out.size()];
        dtype::narrow_from_f32(&values, out, &mut bytes);
        bytes
    }

    #[test]
    fn table_lookup_equals_element_by_element_in_any_band() {
        // Ragged edges (rows and columns not multiples of the block), every byte value (NaN patterns included),
        // scales that make products round and overflow, and bands that start inside a block row.
        let (rows, cols, block) = (37usize, 21usize, (8usize, 5usize));
        let grid = (rows.div_ceil(block.0), cols.div_ceil(block.1));
        let w: Vec<u8> = (0..rows * cols).map(|k| (k * 97 + k / 7) as u8).collect();
        let scales: Vec<f32> =
            (0..grid.0 * grid.1).map(|k| [1.0e-3, 3.7, 1.0e38, -0.5, 7.0e-45, 0.3, 11.0][k % 7]).collect();
        for per_tensor in [false, true] {
            let sc: Vec<f32> = if per_tensor { vec![0.013] } else { scales.clone() };
            let mut bytes = w.clone();
            let w_len = bytes.len() as u64;
            sc.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            let inputs = [Input::new("t", Box::new(bytes))];
            let view = |at, n, dt, shape| Source::View(StridedView::whole("x", 0, at, n, dt, shape).unwrap());
            let weight = view(0, w_len, DType::F8E4M3, vec![rows as u64, cols as u64]);
            let shape = if per_tensor { vec![1] } else { vec![grid.0 as u64, grid.1 as u64] };
            let scale = view(w_len, sc.len() as u64 * 4, DType::F32, shape);
            for out in [DType::BF16, DType::F16, DType::F32] {
                let d = BlockDequant::new(
                    "x",
                    weight.clone(),
                    scale.clone(),
                    &[rows as u64, cols as u64],
                    (block.0 as u64, block.1 as u64),
                    out,
                )
                .unwrap();
                let want = reference(&w, &sc, rows, cols, if per_tensor { (rows, cols) } else { block }, out);
                let mut bufs = ChunkBuffers::default();
                for (r0, r1) in [(0, rows), (3, 17), (17, 18), (30, rows)] {
                    let mut got = vec![0u8; (r1 - r0) * cols * out.size()];
                    d.read(&inputs, (r0 * cols) as u64, ((r1 - r0) * cols) as u64, &mut got, &mut bufs).unwrap();
                    let at = r0 * cols * out.size();
                    assert!(got == want[at..at + got.len()], "{out:?} rows {r0}..{r1} per_tensor {per_tensor}");
                }
            }
        }
    }

    #[test]
    fn fp8_tables_match_the_formats() {
        let t = e4m3fn_table();
        assert_eq!(t[0x38], 1.0); // exponent 7 = bias
        assert_eq!(t[0x7E], 448.0); // the largest finite e4m3fn
        assert_eq!(t[0x01], 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(t[0xB8], -1.0);
        assert!(t[0x7F].is_nan() && t[0xFF].is_nan());
        let t = e5m2_table();
        assert_eq!(t[0x3C], 1.0);
        assert_eq!(t[0x7B], 57344.0);
        assert!(t[0x7C].is_infinite());
    }
}
