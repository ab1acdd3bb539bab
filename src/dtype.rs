//! Element types: the torch names ckptconv accepts, their safetensors names, and the casts between them.
//!
//! Casts follow torch's CPU kernels so that `--dtype` output equals `tensor.to(dtype)` bit for bit:
//! float32 -> bfloat16 rounds to nearest even with NaN made canonical (0x7FC0), float64 narrows through
//! float32 as torch does, and float16 uses IEEE round-to-nearest-even.

use half::f16;

/// An element type that both torch and safetensors can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// float64
    F64,
    /// float32
    F32,
    /// float16
    F16,
    /// bfloat16
    BF16,
    /// int64
    I64,
    /// int32
    I32,
    /// int16
    I16,
    /// int8
    I8,
    /// uint8
    U8,
    /// uint16
    U16,
    /// uint32
    U32,
    /// uint64
    U64,
    /// bool, one byte per element
    Bool,
    /// float8_e4m3fn
    F8E4M3,
    /// float8_e5m2
    F8E5M2,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool | DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// The dtype string in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::U16 => "U16",
            DType::U32 => "U32",
            DType::U64 => "U64",
            DType::Bool => "BOOL",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses a safetensors header dtype string.
    pub fn from_safetensors_name(s: &str) -> Option<DType> {
        ALL.iter().copied().find(|d| d.safetensors_name() == s)
    }

    /// The torch name, e.g. `bfloat16`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
        }
    }

    /// Maps a `torch.<name>` dtype global (including aliases such as `float`, `half`, `long`).
    pub fn from_torch_name(s: &str) -> Option<DType> {
        Some(match s {
            "float64" | "double" => DType::F64,
            "float32" | "float" => DType::F32,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "uint16" => DType::U16,
            "uint32" => DType::U32,
            "uint64" => DType::U64,
            "bool" => DType::Bool,
            "float8_e4m3fn" => DType::F8E4M3,
            "float8_e5m2" => DType::F8E5M2,
            _ => return None,
        })
    }

    /// Maps a typed storage class name such as `BFloat16Storage`.
    pub fn from_storage_class(s: &str) -> Option<DType> {
        Some(match s {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            "Float8_e4m3fnStorage" => DType::F8E4M3,
            "Float8_e5m2Storage" => DType::F8E5M2,
            _ => return None,
        })
    }

    /// Parses a `--dtype` value; `None` for `keep`.
    pub fn from_cli(s: &str) -> Result<Option<DType>, String> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(None),
            "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
            "fp16" | "f16" | "float16" | "half" => Ok(Some(DType::F16)),
            "fp32" | "f32" | "float32" | "float" => Ok(Some(DType::F32)),
            other => Err(format!("unknown dtype '{other}': use keep, bf16, fp16 or fp32")),
        }
    }

    /// Whether `--dtype` applies: only the four IEEE-like float types are cast; ints, bools and
    /// float8 (quantized weights) keep their type, as HF's `torch_dtype` does.
    pub fn is_castable_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

/// Every supported dtype.
pub const ALL: [DType; 15] = [
    DType::F64,
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::U16,
    DType::U32,
    DType::U64,
    DType::Bool,
    DType::F8E4M3,
    DType::F8E5M2,
];

/// float32 -> bfloat16 exactly as torch's `round_to_nearest_even` does.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    // A select rather than an early return, so loops over it vectorize.
    if x.is_nan() { 0x7FC0 } else { rounded }
}

/// Applies `f` element-wise; generic over sizes so each (source, target) pair compiles to its own loop.
#[inline]
fn map<const SI: usize, const DI: usize>(input: &[u8], out: &mut [u8], f: impl Fn([u8; SI]) -> [u8; DI]) {
    for (i, o) in input.chunks_exact(SI).zip(out.chunks_exact_mut(DI)) {
        let mut a = [0u8; SI];
        a.copy_from_slice(i);
        o.copy_from_slice(&f(a));
    }
}

#[inline(always)]
fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

#[cfg(test)]
fn f16_to_f32(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

#[cfg(test)]
fn f32_to_f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// Widens little-endian float elements of type `src` into `out` (exact for f16, bf16 and f32; f64 rounds to
/// nearest, as torch's narrowing does). `out` holds as many elements as `input`.
#[inline(always)]
pub fn widen_to_f32(src: DType, input: &[u8], out: &mut [f32]) {
    #[inline(always)]
    fn each<const N: usize>(input: &[u8], out: &mut [f32], f: impl Fn([u8; N]) -> f32) {
        for (i, o) in input.chunks_exact(N).zip(out.iter_mut()) {
            let mut a = [0u8; N];
            a.copy_from_slice(i);
            *o = f(a);
        }
    }
    match src {
        DType::BF16 => each(input, out, bf16_to_f32),
        DType::F16 => f16_slice_to_f32(input, out),
        DType::F32 => each(input, out, f32::from_le_bytes),
        DType::F64 => each(input, out, |b: [u8; 8]| f64::from_le_bytes(b) as f32),
        // Callers only widen the float types; anything else leaves `out` as it was.
        _ => {}
    }
}

/// Narrows f32 values into little-endian elements of `dst`, with the same rounding as [`cast`] from F32
/// (so `narrow_from_f32(v, d, out)` equals `cast(F32, d, bytes of v, out)`).
#[inline(always)]
pub fn narrow_from_f32(values: &[f32], dst: DType, out: &mut [u8]) {
    #[inline(always)]
    fn each<const N: usize>(values: &[f32], out: &mut [u8], f: impl Fn(f32) -> [u8; N]) {
        for (v, o) in values.iter().zip(out.chunks_exact_mut(N)) {
            o.copy_from_slice(&f(*v));
        }
    }
    match dst {
        DType::BF16 => each(values, out, |v| f32_to_bf16_bits(v).to_le_bytes()),
        DType::F16 => f32_slice_to_f16(values, out),
        DType::F64 => each(values, out, |v| (v as f64).to_le_bytes()),
        // F32, and (never asked for) anything else: the f32 bytes.
        _ => each(values, out, f32::to_le_bytes),
    }
}

/// Elements a cast converts per step, through f32 buffers on the stack that stay in the L1 cache.
const STEP: usize = 1024;

/// f16 elements (little-endian bytes) to f32, 8 at a time where the CPU converts in hardware (F16C, aarch64's
/// fp16); `half` picks the instruction at run time and falls back to its exact software conversion elsewhere
/// (WASI, the browser), which gives the same values.
#[inline(always)]
fn f16_slice_to_f32(input: &[u8], out: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let mut bits = [0u16; STEP];
    for (i, o) in input.chunks(2 * STEP).zip(out.chunks_mut(STEP)) {
        let n = (i.len() / 2).min(o.len());
        for (b, e) in bits.iter_mut().zip(i.chunks_exact(2)) {
            *b = u16::from_le_bytes([e[0], e[1]]);
        }
        bits[..n].reinterpret_cast::<f16>().convert_to_f32_slice(&mut o[..n]);
    }
}

/// f32 to f16 (little-endian bytes) with IEEE round-to-nearest-even, vectorized like [`f16_slice_to_f32`]; the
/// hardware and software conversions agree on every input, NaN payloads included.
#[inline(always)]
fn f32_slice_to_f16(values: &[f32], out: &mut [u8]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let mut bits = [0u16; STEP];
    for (v, o) in values.chunks(STEP).zip(out.chunks_mut(2 * STEP)) {
        let n = v.len().min(o.len() / 2);
        bits[..n].reinterpret_cast_mut::<f16>().convert_from_f32_slice(&v[..n]);
        for (b, e) in bits.iter().zip(o.chunks_exact_mut(2)) {
            e.copy_from_slice(&b.to_le_bytes());
        }
    }
}

/// Converts little-endian elements of `src` into `dst`. Both types must be castable floats,
/// and `out` must hold as many elements as `input`.
pub fn cast(src: DType, dst: DType, input: &[u8], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above.
        unsafe { cast_avx2(src, dst, input, out) };
        return;
    }
    cast_portable(src, dst, input, out);
}

/// [`cast_portable`] compiled with AVX2 and F16C: the same element functions in wider vectors, and f32 -> f16
/// with the conversion instruction itself (`half` picks the same instruction, 8 elements at a time, through
/// copies that halve its speed).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn cast_avx2(src: DType, dst: DType, input: &[u8], out: &mut [u8]) {
    if dst != DType::F16 || !src.is_castable_float() || src == dst {
        return cast_portable(src, dst, input, out);
    }
    if src == DType::F32 {
        // SAFETY: this function only runs where the CPU has F16C.
        return unsafe { f32_to_f16_f16c(input, out) };
    }
    let (ss, ds) = (src.size(), dst.size());
    let mut values = [0f32; STEP];
    for (i, o) in input.chunks(STEP * ss).zip(out.chunks_mut(STEP * ds)) {
        let n = (i.len() / ss).min(o.len() / ds);
        widen_to_f32(src, &i[..n * ss], &mut values[..n]);
        // SAFETY: as above.
        unsafe { f32_values_to_f16_f16c(&values[..n], &mut o[..n * ds]) };
    }
}

/// Little-endian f32 bytes to f16 bytes, 8 at a time with `vcvtps2ph` (round to nearest even, the rounding
/// `half`'s software path reproduces); the tail goes through [`f32_slice_to_f16`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f32_to_f16_f16c(input: &[u8], out: &mut [u8]) {
    use std::arch::x86_64::{__m128i, _MM_FROUND_TO_NEAREST_INT, _mm_storeu_si128, _mm256_cvtps_ph, _mm256_loadu_ps};
    let n = (input.len() / 4).min(out.len() / 2);
    let whole = n / 8 * 8;
    for k in (0..whole).step_by(8) {
        // SAFETY: k + 8 <= n, so 32 bytes of input from 4k and 16 bytes of output from 2k are in bounds; the
        // unaligned load and store need no alignment.
        unsafe {
            let x = _mm256_loadu_ps(input.as_ptr().add(4 * k).cast::<f32>());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(out.as_mut_ptr().add(2 * k).cast::<__m128i>(), h);
        }
    }
    let mut tail = [0f32; 8];
    for (t, b) in tail.iter_mut().zip(input[4 * whole..4 * n].chunks_exact(4)) {
        *t = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    f32_slice_to_f16(&tail[..n - whole], &mut out[2 * whole..2 * n]);
}

/// f32 values to f16 bytes with `vcvtps2ph`, as [`f32_to_f16_f16c`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f32_values_to_f16_f16c(values: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::{__m128i, _MM_FROUND_TO_NEAREST_INT, _mm_storeu_si128, _mm256_cvtps_ph, _mm256_loadu_ps};
    let n = values.len().min(out.len() / 2);
    let whole = n / 8 * 8;
    for k in (0..whole).step_by(8) {
        // SAFETY: k + 8 <= n, so 8 values from k and 16 output bytes from 2k are in bounds.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(values.as_ptr().add(k)));
            _mm_storeu_si128(out.as_mut_ptr().add(2 * k).cast::<__m128i>(), h);
        }
    }
    f32_slice_to_f16(&values[whole..n], &mut out[2 * whole..2 * n]);
}

/// Every float cast widens to f32 and narrows from it, a block at a time: widening is exact, and torch narrows
/// f64 through f32 before any 16-bit type, so this is the rounding torch does.
#[inline(always)]
fn cast_portable(src: DType, dst: DType, input: &[u8], out: &mut [u8]) {
    let floats = src.is_castable_float() && dst.is_castable_float();
    if src == dst || !floats {
        // Callers only cast between the four float types; anything else is copied unchanged.
        let n = input.len().min(out.len());
        out[..n].copy_from_slice(&input[..n]);
        return;
    }
    if (src, dst) == (DType::F32, DType::BF16) {
        // The commonest cast, one pass without the f32 buffer.
        return map(input, out, |b: [u8; 4]| f32_to_bf16_bits(f32::from_le_bytes(b)).to_le_bytes());
    }
    let (ss, ds) = (src.size(), dst.size());
    let mut values = [0f32; STEP];
    for (i, o) in input.chunks(STEP * ss).zip(out.chunks_mut(STEP * ds)) {
        let n = (i.len() / ss).min(o.len() / ds);
        widen_to_f32(src, &i[..n * ss], &mut values[..n]);
        narrow_from_f32(&values[..n], dst, &mut o[..n * ds]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_ties_to_even() {
        // 1.0 + 2^-8 sits exactly between two bf16 values; the even one is 1.0.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        // 1.0 + 3*2^-8 is a tie whose even neighbour is above.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(f32_to_bf16_bits(f32::NAN), 0x7FC0);
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7F80);
        // The largest finite f32 overflows to infinity under round-to-nearest.
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80);
    }

    #[test]
    fn cast_round_trips_through_wider_types() {
        let vals: Vec<u8> = [1.5f32, -2.25, 65504.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut h = vec![0u8; 6];
        cast(DType::F32, DType::F16, &vals, &mut h);
        let mut back = vec![0u8; 12];
        cast(DType::F16, DType::F32, &h, &mut back);
        assert_eq!(back, vals);
    }

    /// The per-element cast the block kernels must equal: one element at a time through `half`'s scalar conversions.
    fn cast_reference(src: DType, dst: DType, input: &[u8], out: &mut [u8]) {
        let (ss, ds) = (src.size(), dst.size());
        if src == dst {
            return out.copy_from_slice(input);
        }
        for (i, o) in input.chunks_exact(ss).zip(out.chunks_exact_mut(ds)) {
            let v = match src {
                DType::F64 => f64::from_le_bytes(i.try_into().unwrap()) as f32,
                DType::F32 => f32::from_le_bytes(i.try_into().unwrap()),
                DType::F16 => f16_to_f32(i.try_into().unwrap()),
                _ => bf16_to_f32(i.try_into().unwrap()),
            };
            match dst {
                DType::F64 => o.copy_from_slice(&(v as f64).to_le_bytes()),
                DType::F32 => o.copy_from_slice(&v.to_le_bytes()),
                DType::F16 => o.copy_from_slice(&f32_to_f16_bytes(v)),
                _ => o.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes()),
            }
        }
    }

    /// Bit patterns of every kind: each 16-bit value; for f32 a stride through all patterns plus, for every exponent,
    /// the mantissas around the f16 and bf16 rounding points (ties, just below and above), NaN payloads, subnormals.
    fn patterns(src: DType) -> Vec<u8> {
        let edges = [
            0u32, 1, 2, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x1_8000, 0x40_0000,
            0x7F_FFFF,
        ];
        let f32s = || {
            let strided = (0..=u32::MAX / 40_009).map(|k| k * 40_009);
            let edged = (0u32..512).flat_map(move |se| edges.into_iter().map(move |m| (se << 23) | m));
            strided.chain(edged)
        };
        match src {
            DType::F16 | DType::BF16 => (0..=u16::MAX).flat_map(u16::to_le_bytes).collect(),
            DType::F32 => f32s().flat_map(u32::to_le_bytes).collect(),
            // f64s that are f32 values, f32 ties and their neighbours (double rounding), and strided patterns.
            _ => f32s()
                .flat_map(|b| {
                    let d = f32::from_bits(b) as f64;
                    let ulp = (f32::from_bits(b | 1) as f64 - f32::from_bits(b & !1) as f64).abs();
                    [d, d + ulp / 2.0, d - ulp / 2.0, d + ulp / 3.0]
                })
                .chain((0..=u64::MAX / 7_919_993_012_345).map(|k| f64::from_bits(k * 7_919_993_012_345)))
                .flat_map(f64::to_le_bytes)
                .collect(),
        }
    }

    #[test]
    fn block_casts_equal_the_element_reference() {
        let floats = [DType::F64, DType::F32, DType::F16, DType::BF16];
        for src in floats {
            // An odd count, so every kernel's remainder path runs too.
            let mut input = patterns(src);
            input.truncate((input.len() / src.size() / 2 * 2 - 3) * src.size());
            for dst in floats {
                let n = input.len() / src.size();
                let (mut got, mut want) = (vec![0u8; n * dst.size()], vec![0u8; n * dst.size()]);
                cast(src, dst, &input, &mut got);
                cast_reference(src, dst, &input, &mut want);
                let bad = got.chunks(dst.size()).zip(want.chunks(dst.size())).position(|(g, w)| g != w);
                assert_eq!(bad, None, "{src:?} -> {dst:?} differs at element {bad:?}");
                // The portable kernel (WASI, the browser) gives the same bits as the dispatched one.
                let mut portable = vec![0u8; n * dst.size()];
                cast_portable(src, dst, &input, &mut portable);
                assert!(portable == want, "{src:?} -> {dst:?}: the portable kernel differs");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for d in ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
        }
    }
}
