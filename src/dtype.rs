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

#[inline]
fn f16_to_f32(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

#[inline]
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
        DType::F16 => each(input, out, f16_to_f32),
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
        DType::F16 => each(values, out, f32_to_f16_bytes),
        DType::F64 => each(values, out, |v| (v as f64).to_le_bytes()),
        // F32, and (never asked for) anything else: the f32 bytes.
        _ => each(values, out, f32::to_le_bytes),
    }
}

/// Converts little-endian elements of `src` into `dst`. Both types must be castable floats,
/// and `out` must hold as many elements as `input`.
pub fn cast(src: DType, dst: DType, input: &[u8], out: &mut [u8]) {
    use DType::*;
    // torch narrows f64 to f32 before any 16-bit type; widening is exact.
    match (src, dst) {
        _ if src == dst => out.copy_from_slice(input),
        (F32, BF16) => map(input, out, |b: [u8; 4]| f32_to_bf16_bits(f32::from_le_bytes(b)).to_le_bytes()),
        (F32, F16) => map(input, out, |b: [u8; 4]| f32_to_f16_bytes(f32::from_le_bytes(b))),
        (F64, BF16) => map(input, out, |b: [u8; 8]| f32_to_bf16_bits(f64::from_le_bytes(b) as f32).to_le_bytes()),
        (F64, F16) => map(input, out, |b: [u8; 8]| f32_to_f16_bytes(f64::from_le_bytes(b) as f32)),
        (F64, F32) => map(input, out, |b: [u8; 8]| (f64::from_le_bytes(b) as f32).to_le_bytes()),
        (BF16, F32) => map(input, out, |b: [u8; 2]| bf16_to_f32(b).to_le_bytes()),
        (F16, F32) => map(input, out, |b: [u8; 2]| f16_to_f32(b).to_le_bytes()),
        (BF16, F16) => map(input, out, |b: [u8; 2]| f32_to_f16_bytes(bf16_to_f32(b))),
        (F16, BF16) => map(input, out, |b: [u8; 2]| f32_to_bf16_bits(f16_to_f32(b)).to_le_bytes()),
        (BF16, F64) => map(input, out, |b: [u8; 2]| (bf16_to_f32(b) as f64).to_le_bytes()),
        (F16, F64) => map(input, out, |b: [u8; 2]| (f16_to_f32(b) as f64).to_le_bytes()),
        (F32, F64) => map(input, out, |b: [u8; 4]| (f32::from_le_bytes(b) as f64).to_le_bytes()),
        // Callers only cast between the four float types; anything else is copied unchanged.
        _ => {
            let n = input.len().min(out.len());
            out[..n].copy_from_slice(&input[..n]);
        }
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

    #[test]
    fn names_round_trip() {
        for d in ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
        }
    }
}
