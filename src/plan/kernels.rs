//! The LoRA merge's kernels: `acc += coef @ a` with a fixed order of operations (the same bits on every target),
//! register-blocked for AVX2 and AVX-512, a fused bf16 AVX-512 path, and the portable loop that is the reference.

#[cfg(target_arch = "x86_64")]
use crate::dtype::{self, DType};

/// [`dtype::widen_to_f32`] compiled with AVX2 (the same element function, in wider vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn widen_avx2(src: DType, input: &[u8], out: &mut [f32]) {
    dtype::widen_to_f32(src, input, out);
}

/// [`dtype::narrow_from_f32`] compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn narrow_avx2(values: &[f32], dst: DType, out: &mut [u8]) {
    dtype::narrow_from_f32(values, dst, out);
}

/// `acc += coef @ a` with a fixed order of operations: every element adds its rank terms one by one, in
/// order, as separate multiplies and adds (never fused). The result is therefore the same bits on every
/// target and whatever the vector width, so native, WASI and browser outputs stay byte-identical.
pub(super) fn lora_rows(acc: &mut [f32], coef: &[f32], a: &[f32], rank: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        unsafe { lora_rows_avx512(acc, coef, a, rank, cols) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { lora_rows_avx2(acc, coef, a, rank, cols) };
        return;
    }
    lora_rows_plain(acc, coef, a, rank, cols);
}

/// Defines a register-blocked kernel: a 4-row x (`$nv` vectors of `$lanes`) tile of `acc` lives in registers while
/// the rank loop runs, so each element still gets `acc = acc + c_k * a_kj` for k = 0, 1, ... in order, as separate
/// multiplies and adds (no FMA): the same bits as [`lora_rows_plain`], with the loads and stores of `acc` done once
/// instead of `rank` times. Columns are taken in blocks of `$block` so that the block of A stays in L1.
macro_rules! lora_kernel {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $lanes:literal, $nv:literal, $block:literal,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $add:ident, $mul:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(acc: &mut [f32], coef: &[f32], a: &[f32], rank: usize, cols: usize) {
            use std::arch::x86_64::*;
            const WIDE: usize = $lanes * $nv;
            let rows = acc.len() / cols;
            let groups = rows / 4;
            assert!(coef.len() >= rows * rank && a.len() >= rank * cols);
            let (accp, cp, ap) = (acc.as_mut_ptr(), coef.as_ptr(), a.as_ptr());
            for jb in (0..cols).step_by($block) {
                let je = (jb + $block).min(cols);
                let wide_end = jb + (je - jb) / WIDE * WIDE;
                for g in 0..groups {
                    let r = g * 4;
                    let mut j = jb;
                    while j < wide_end {
                        // SAFETY: rows r..r+4 exist (g < rows / 4) and columns j..j+WIDE lie inside the row
                        // (j + WIDE <= je <= cols); A holds rank rows of cols columns and coef rows x rank values
                        // (asserted above).
                        unsafe {
                            let o = [
                                accp.add(r * cols + j),
                                accp.add((r + 1) * cols + j),
                                accp.add((r + 2) * cols + j),
                                accp.add((r + 3) * cols + j),
                            ];
                            let mut t = [[$zero(); $nv]; 4];
                            for (ti, &op) in t.iter_mut().zip(&o) {
                                for (v, tv) in ti.iter_mut().enumerate() {
                                    *tv = $load(op.add($lanes * v));
                                }
                            }
                            for k in 0..rank {
                                let ak = ap.add(k * cols + j);
                                let mut av = [$zero(); $nv];
                                for (v, x) in av.iter_mut().enumerate() {
                                    *x = $load(ak.add($lanes * v));
                                }
                                for (i, ti) in t.iter_mut().enumerate() {
                                    let c = $set1(*cp.add((r + i) * rank + k));
                                    for (tv, &x) in ti.iter_mut().zip(&av) {
                                        *tv = $add(*tv, $mul(c, x));
                                    }
                                }
                            }
                            for (ti, &op) in t.iter().zip(&o) {
                                for (v, tv) in ti.iter().enumerate() {
                                    $store(op.add($lanes * v), *tv);
                                }
                            }
                        }
                        j += WIDE;
                    }
                    // Columns left over in this block: one element at a time, same order.
                    for row in r..r + 4 {
                        f32_tail(acc, coef, a, rank, cols, row, wide_end..je);
                    }
                }
            }
            // Rows left over (fewer than four).
            let done = groups * 4 * cols;
            lora_rows_plain(&mut acc[done..], &coef[groups * 4 * rank..], a, rank, cols);
        }
    };
}

lora_kernel!(
    /// AVX2: a 4 x 24 tile in twelve registers; 192 columns of A (24 KiB at r = 32) per block.
    lora_rows_avx2, "avx2", 8, 3, 192,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_add_ps, _mm256_mul_ps
);
lora_kernel!(
    /// AVX-512: a 4 x 64 tile in sixteen registers; 256 columns of A (32 KiB at r = 32) per block.
    lora_rows_avx512, "avx512f", 16, 4, 256,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_add_ps, _mm512_mul_ps
);

/// bf16 in, bf16 out, with AVX-512: the AVX-512 kernel's tiles, but W is widened from bf16 as a tile is loaded and
/// the sum is rounded to bf16 as it is stored (round to nearest even, NaN to 0x7FC0: [`dtype::f32_to_bf16_bits`]
/// in vector form), so no f32 copy of the band exists. Per element: widen, add the rank terms in order, round once:
/// the same bits as widening, [`lora_rows_plain`] and narrowing.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn lora_rows_avx512_bf16(
    w: &[u8],
    coef: &[f32],
    a: &[f32],
    rank: usize,
    cols: usize,
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    const BLOCK: usize = 256;
    let rows = w.len() / 2 / cols;
    let groups = rows / 4;
    assert!(coef.len() >= rows * rank && a.len() >= rank * cols && out.len() >= rows * cols * 2);
    let (wp, op, cp, ap) = (w.as_ptr(), out.as_mut_ptr(), coef.as_ptr(), a.as_ptr());
    // SAFETY (both helpers): `p` points at 16 bf16 values inside the band (checked by the callers' bounds).
    let load = |p: *const u8| unsafe {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    };
    let store = |p: *mut u8, v: __m512| unsafe {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb);
        let rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
        let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        let r = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
        _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r));
    };
    for jb in (0..cols).step_by(BLOCK) {
        let je = (jb + BLOCK).min(cols);
        let wide_end = jb + (je - jb) / 64 * 64;
        for g in 0..groups {
            let r = g * 4;
            let mut j = jb;
            while j < wide_end {
                // SAFETY: rows r..r+4 and columns j..j+64 lie inside the band (j + 64 <= je <= cols).
                unsafe {
                    let at = [r * cols + j, (r + 1) * cols + j, (r + 2) * cols + j, (r + 3) * cols + j];
                    let mut t = [[_mm512_setzero_ps(); 4]; 4];
                    for (ti, &e) in t.iter_mut().zip(&at) {
                        for (v, tv) in ti.iter_mut().enumerate() {
                            *tv = load(wp.add(2 * (e + 16 * v)));
                        }
                    }
                    for k in 0..rank {
                        let ak = ap.add(k * cols + j);
                        let av = [
                            _mm512_loadu_ps(ak),
                            _mm512_loadu_ps(ak.add(16)),
                            _mm512_loadu_ps(ak.add(32)),
                            _mm512_loadu_ps(ak.add(48)),
                        ];
                        for (i, ti) in t.iter_mut().enumerate() {
                            let c = _mm512_set1_ps(*cp.add((r + i) * rank + k));
                            for (tv, &x) in ti.iter_mut().zip(&av) {
                                *tv = _mm512_add_ps(*tv, _mm512_mul_ps(c, x));
                            }
                        }
                    }
                    for (ti, &e) in t.iter().zip(&at) {
                        for (v, tv) in ti.iter().enumerate() {
                            store(op.add(2 * (e + 16 * v)), *tv);
                        }
                    }
                }
                j += 64;
            }
            for row in r..r + 4 {
                bf16_tail(w, coef, a, rank, cols, out, row, wide_end..je);
            }
        }
    }
    for row in groups * 4..rows {
        bf16_tail(w, coef, a, rank, cols, out, row, 0..cols);
    }
}

/// One row's columns `range` of an f32 merge, an element at a time (the same operations as the vector paths).
#[cfg(target_arch = "x86_64")]
fn f32_tail(
    acc: &mut [f32],
    coef: &[f32],
    a: &[f32],
    rank: usize,
    cols: usize,
    row: usize,
    range: std::ops::Range<usize>,
) {
    let c = &coef[row * rank..(row + 1) * rank];
    for j in range {
        let mut v = acc[row * cols + j];
        for (k, &ck) in c.iter().enumerate() {
            v += ck * a[k * cols + j];
        }
        acc[row * cols + j] = v;
    }
}

/// One row's columns `range` of a bf16 merge, an element at a time (the same operations as the vector paths).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn bf16_tail(
    w: &[u8],
    coef: &[f32],
    a: &[f32],
    rank: usize,
    cols: usize,
    out: &mut [u8],
    row: usize,
    range: std::ops::Range<usize>,
) {
    let c = &coef[row * rank..(row + 1) * rank];
    for j in range {
        let e = row * cols + j;
        let mut v = f32::from_bits((u16::from_le_bytes([w[2 * e], w[2 * e + 1]]) as u32) << 16);
        for (k, &ck) in c.iter().enumerate() {
            v += ck * a[k * cols + j];
        }
        out[2 * e..2 * e + 2].copy_from_slice(&dtype::f32_to_bf16_bits(v).to_le_bytes());
    }
}

/// Columns of an output tile in the portable kernel: a tile of four rows stays in L1 while the rank loop runs over it.
const LORA_TILE: usize = 256;

/// The portable kernel (WASI, the browser, CPUs without AVX2), and the reference order of operations.
#[inline(always)]
fn lora_rows_plain(acc: &mut [f32], coef: &[f32], a: &[f32], rank: usize, cols: usize) {
    for (rows4, c4) in acc.chunks_mut(4 * cols).zip(coef.chunks(4 * rank)) {
        for j0 in (0..cols).step_by(LORA_TILE) {
            let j1 = (j0 + LORA_TILE).min(cols);
            for k in 0..rank {
                let a_tile = &a[k * cols + j0..k * cols + j1];
                for (row, c) in rows4.chunks_mut(cols).zip(c4.chunks(rank)) {
                    let ck = c[k];
                    for (o, &x) in row[j0..j1].iter_mut().zip(a_tile) {
                        *o += ck * x;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::merge::{Band, Dest, WRows, lora_band};
    use super::*;
    #[allow(unused_imports)] // on x86_64 the module imports them already
    use crate::dtype::{self, DType};

    /// The register-blocked AVX2 kernel and the threaded split give the same bits as the one-element-at-a-time loop,
    /// on shapes that leave partial row groups, partial 24-column tiles and partial column blocks.
    #[test]
    fn lora_kernels_agree_bit_for_bit() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Values of mixed magnitude, so that the order of additions matters to the last bit.
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * if seed & 1 == 0 { 1.0 } else { 1e-3 }
        };
        for (rows, cols, rank) in
            [(1, 5, 1), (7, 23, 3), (9, 200, 8), (130, 413, 32), (66, 24, 16), (4, 192 + 24 + 7, 5)]
        {
            let mut w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            // Values the rounding must get right too: NaN, infinity, and the largest finite f32 (rounds to infinity).
            for (i, x) in [f32::NAN, f32::INFINITY, f32::MAX, -0.0].into_iter().enumerate() {
                if let Some(v) = w.get_mut(i * 37 % (rows * cols)) {
                    *v = x;
                }
            }
            let coef: Vec<f32> = (0..rows * rank).map(|_| next()).collect();
            let a: Vec<f32> = (0..rank * cols).map(|_| next()).collect();
            let mut want = w.clone();
            for r in 0..rows {
                for j in 0..cols {
                    let mut v = want[r * cols + j];
                    for k in 0..rank {
                        v += coef[r * rank + k] * a[k * cols + j];
                    }
                    want[r * cols + j] = v;
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut plain = w.clone();
            lora_rows_plain(&mut plain, &coef, &a, rank, cols);
            let mut dispatched = w.clone();
            lora_rows(&mut dispatched, &coef, &a, rank, cols);
            #[cfg(target_arch = "x86_64")]
            for (feature, kernel) in [
                ("avx2", lora_rows_avx2 as unsafe fn(&mut [f32], &[f32], &[f32], usize, usize)),
                ("avx512f", lora_rows_avx512),
            ] {
                let on = match feature {
                    "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                    _ => std::arch::is_x86_feature_detected!("avx512f"),
                };
                if on {
                    let mut v = w.clone();
                    // SAFETY: the CPU has the feature, checked just above.
                    unsafe { kernel(&mut v, &coef, &a, rank, cols) };
                    assert_eq!(bits(&v), bits(&want), "{feature} kernel, {rows}x{cols} r{rank}");
                }
            }
            // The whole band path (widen, two threads, narrow to f32) on f32 bytes of W.
            let wb: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let band =
                Band { w: WRows::Mem(&wb), w_dtype: DType::F32, coef: &coef, a: &a, rank, cols, out_dtype: DType::F32 };
            let mut out = vec![0u8; rows * cols * 4];
            lora_band(&band, rows, Dest::Mem(&mut out)).unwrap();
            let banded: Vec<f32> = out.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(bits(&banded), bits(&want), "band path, {rows}x{cols} r{rank}");
            // bf16 in and out (the fused AVX-512 path where the CPU has it): W rounded to bf16 first, then merged and
            // rounded once; compared with widening, the reference loop and torch-exact narrowing.
            let wb16: Vec<u8> = w.iter().flat_map(|&x| dtype::f32_to_bf16_bits(x).to_le_bytes()).collect();
            let mut want16 = vec![0f32; rows * cols];
            dtype::widen_to_f32(DType::BF16, &wb16, &mut want16);
            lora_rows_plain(&mut want16, &coef, &a, rank, cols);
            let mut want16_bytes = vec![0u8; rows * cols * 2];
            dtype::narrow_from_f32(&want16, DType::BF16, &mut want16_bytes);
            let band = Band {
                w: WRows::Mem(&wb16),
                w_dtype: DType::BF16,
                coef: &coef,
                a: &a,
                rank,
                cols,
                out_dtype: DType::BF16,
            };
            let mut out16 = vec![0u8; rows * cols * 2];
            lora_band(&band, rows, Dest::Mem(&mut out16)).unwrap();
            assert_eq!(out16, want16_bytes, "bf16 band path, {rows}x{cols} r{rank}");
            assert_eq!(bits(&plain), bits(&want), "plain kernel, {rows}x{cols} r{rank}");
            assert_eq!(bits(&dispatched), bits(&want), "dispatched kernel, {rows}x{cols} r{rank}");
        }
    }
}
