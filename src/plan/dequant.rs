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

/// Every FP8 byte's value, by bit pattern (e4m3fn: bias 7, no infinities, S.1111.111 is NaN).
fn e4m3fn_table() -> [f32; 256] {
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

/// e5m2 is the top byte of an IEEE half.
fn e5m2_table() -> [f32; 256] {
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
        let mut values = std::mem::take(&mut bufs.deq_values);
        values.clear();
        values.resize(count as usize, 0.0);
        // Bands are whole rows: walk each row block by block, one scale per run of columns.
        let bw = self.block.1.min(cols) as usize;
        for (k, (row, vals)) in raw.chunks(cols as usize).zip(values.chunks_mut(cols as usize)).enumerate() {
            let r = r0 + k as u64;
            let srow = if per_tensor { 0 } else { ((r / self.block.0 - s0) * grid_cols) as usize };
            for (j, (bytes, vs)) in row.chunks(bw).zip(vals.chunks_mut(bw)).enumerate() {
                let s = if per_tensor { scales[0] } else { scales[srow + j] };
                for (v, &b) in vs.iter_mut().zip(bytes) {
                    *v = table[b as usize] * s;
                }
            }
        }
        dtype::narrow_from_f32(&values, self.out, out);
        bufs.deq_values = values;
        bufs.deq_raw = raw;
        bufs.deq_scale = scale_raw;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
