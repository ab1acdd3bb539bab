//! Chunked tensors: a global tensor assembled from chunks (boxes of it, each a view) that tile it exactly, as DCP
//! shards, verl DTensor shards and Megatron ranks give them.

use super::{ChunkBuffers, StridedView, fit};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::io::Input;

/// One chunk of a [`ChunkedTensor`]: a box of the global tensor and the view holding its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Start of the box in each dimension.
    pub offsets: Vec<u64>,
    /// Extent of the box in each dimension (none zero).
    pub sizes: Vec<u64>,
    /// The chunk's elements, in the chunk's own row-major order.
    pub view: StridedView,
}

/// Grid cells the overlap check may mark per chunk (plus [`GRID_CELL_ALLOWANCE`]); real shardings cut each
/// dimension into pieces, so their chunks' cuts make exactly one cell per chunk.
const GRID_CELLS_PER_CHUNK: u64 = 4;
const GRID_CELL_ALLOWANCE: u64 = 4096;
/// Most chunks compared pair by pair when their cuts do not form a grid.
const MAX_PAIRWISE_CHUNKS: usize = 4096;

/// Checks that boxes `(offsets, sizes)` tile `shape` exactly: inside its bounds, no overlap, no gap.
///
/// Overlaps are found on the grid that every box's edges cut the tensor into: each box marks the cells it covers,
/// and a cell marked twice is an overlap. When the boxes are disjoint the marks cover each cell at most once, so
/// the check costs O(cells + k log k) for k boxes, not the O(k^2) of comparing every pair.
pub fn check_tiling(name: &str, shape: &[u64], boxes: &[(&[u64], &[u64])]) -> Result<()> {
    let nd = shape.len();
    let numel =
        shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| tensor_err(name, "shape overflows"))?;
    let mut covered = 0u64;
    let mut live: Vec<(&[u64], &[u64])> = Vec::new();
    for &(off, size) in boxes {
        if off.len() != nd || size.len() != nd {
            return Err(tensor_err(name, format!("chunk {off:?} has the wrong number of dimensions")));
        }
        if (0..nd).any(|d| off[d].checked_add(size[d]).is_none_or(|e| e > shape[d])) {
            return Err(tensor_err(
                name,
                format!("chunk at {off:?} of size {size:?} lies outside the shape {shape:?}"),
            ));
        }
        // Inside the shape, so no larger than its (checked) element count.
        let vol = size.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX);
        if vol == 0 {
            continue;
        }
        live.push((off, size));
        covered = covered.saturating_add(vol);
    }
    if let Some((a, b)) = first_overlap(name, shape, &live)? {
        return Err(tensor_err(name, format!("chunks at {a:?} and {b:?} overlap")));
    }
    if covered != numel {
        return Err(tensor_err(
            name,
            format!("chunks cover {covered} of {numel} elements: the checkpoint has a gap (a missing rank?)"),
        ));
    }
    Ok(())
}

/// The offsets of the first two boxes that overlap (the earlier one first), if any; `boxes` are non-empty
/// and inside `shape`.
fn first_overlap<'b>(
    name: &str,
    shape: &[u64],
    boxes: &[(&'b [u64], &'b [u64])],
) -> Result<Option<(&'b [u64], &'b [u64])>> {
    let nd = shape.len();
    // Every box edge, per dimension, sorted: the grid's cut lines.
    let cuts: Vec<Vec<u64>> = (0..nd)
        .map(|d| {
            let mut c: Vec<u64> = boxes.iter().flat_map(|(o, s)| [o[d], o[d].saturating_add(s[d])]).collect();
            c.sort_unstable();
            c.dedup();
            c
        })
        .collect();
    let cells = cuts.iter().try_fold(1u64, |a, c| a.checked_mul(c.len().saturating_sub(1) as u64));
    let k = boxes.len() as u64;
    let budget = k.saturating_mul(GRID_CELLS_PER_CHUNK).saturating_add(GRID_CELL_ALLOWANCE);
    let Some(cells) = cells.filter(|&c| c <= budget) else {
        if boxes.len() > MAX_PAIRWISE_CHUNKS {
            return Err(Error::new(ErrorKind::Limit(format!(
                "tensor '{name}' has {} chunks whose edges do not form a grid; at most {MAX_PAIRWISE_CHUNKS} such chunks are checked",
                boxes.len()
            ))));
        }
        for (i, &(off, size)) in boxes.iter().enumerate() {
            let earlier = boxes[..i].iter().find(|(o, s)| {
                (0..nd).all(|d| off[d] < o[d].saturating_add(s[d]) && o[d] < off[d].saturating_add(size[d]))
            });
            if let Some(&(o, _)) = earlier {
                return Ok(Some((o, off)));
            }
        }
        return Ok(None);
    };
    // Row-major strides of the cell grid; each cell remembers the box that covers it.
    let mut strides = vec![1usize; nd];
    for d in (0..nd.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * cuts[d + 1].len().saturating_sub(1);
    }
    let cells = usize::try_from(cells).map_err(|_| tensor_err(name, "too many chunk grid cells"))?;
    let mut owner = vec![u32::MAX; cells];
    for (i, &(off, size)) in boxes.iter().enumerate() {
        let i = u32::try_from(i).map_err(|_| tensor_err(name, "more than 2^32 chunks"))?;
        // The cell range of this box in each dimension (its edges are cuts, so both are found).
        let range: Vec<(usize, usize)> = (0..nd)
            .map(|d| {
                let at = |v: u64| cuts[d].binary_search(&v).unwrap_or_else(|e| e);
                (at(off[d]), at(off[d].saturating_add(size[d])))
            })
            .collect();
        let mut idx: Vec<usize> = range.iter().map(|r| r.0).collect();
        'cells: loop {
            let cell: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
            match owner.get_mut(cell) {
                Some(o) if *o != u32::MAX => return Ok(boxes.get(*o as usize).map(|b| (b.0, off))),
                Some(o) => *o = i,
                None => return Err(tensor_err(name, "chunk grid index out of range")),
            }
            // The box's next cell, last dimension fastest.
            let mut d = nd;
            loop {
                if d == 0 {
                    break 'cells;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < range[d].1 {
                    break;
                }
                idx[d] = range[d].0;
            }
        }
    }
    Ok(None)
}

/// A global tensor assembled from chunks that tile it (DCP shards, later Megatron ranks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedTensor {
    shape: Vec<u64>,
    pub(super) dtype: DType,
    pub(super) chunks: Vec<Chunk>,
    /// Elements per row of dimension 0 (1 for 0-d and 1-d tensors).
    pub(super) row: u64,
    /// Whether every chunk spans whole rows and is contiguous, so its rows are contiguous in the output.
    row_slabs: bool,
}

impl ChunkedTensor {
    /// The chunks, as built.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Builds a chunked tensor; the caller has checked that the chunks tile `shape` exactly.
    pub fn new(name: &str, shape: Vec<u64>, dtype: DType, mut chunks: Vec<Chunk>) -> Result<Self> {
        for c in &chunks {
            if c.view.dtype != dtype || c.sizes.len() != shape.len() {
                return Err(tensor_err(name, "chunk does not match the tensor's dtype or rank"));
            }
        }
        chunks.sort_by(|a, b| a.offsets.cmp(&b.offsets));
        let row = shape.iter().skip(1).product::<u64>().max(1);
        let row_slabs = chunks.iter().all(|c| c.view.is_contiguous() && c.sizes.get(1..) == shape.get(1..));
        Ok(ChunkedTensor { shape, dtype, chunks, row, row_slabs })
    }

    pub(super) fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Index `i` of dimension 0, without that dimension, then rows `[a, b)` (see [`super::Source::slice`]).
    pub fn slice(&self, name: &str, i: u64, (a, b): (u64, u64)) -> Result<ChunkedTensor> {
        let (Some(&n), Some(&rows)) = (self.shape.first(), self.shape.get(1)) else {
            return Err(tensor_err(name, format!("cannot take rows of one item of a {:?} tensor", self.shape)));
        };
        if i >= n || a > b || b > rows {
            return Err(tensor_err(name, format!("item {i}, rows {a}..{b} of a {:?} tensor", self.shape)));
        }
        let mut chunks = Vec::new();
        for c in &self.chunks {
            let (o0, o1) = (c.offsets[0], c.offsets[1]);
            if i < o0 || i >= o0 + c.sizes[0] || o1 + c.sizes[1] <= a || o1 >= b {
                continue;
            }
            let (lo, hi) = (a.max(o1), b.min(o1 + c.sizes[1]));
            let view = c.view.layer(name, i - o0)?.rows(name, lo - o1, hi - o1)?;
            let mut offsets = c.offsets[1..].to_vec();
            offsets[0] = lo - a;
            chunks.push(Chunk { offsets, sizes: view.shape.clone(), view });
        }
        let mut shape = self.shape[1..].to_vec();
        shape[0] = b - a;
        let boxes: Vec<(&[u64], &[u64])> = chunks.iter().map(|c| (c.offsets.as_slice(), c.sizes.as_slice())).collect();
        check_tiling(name, &shape, &boxes)?;
        ChunkedTensor::new(name, shape, self.dtype, chunks)
    }

    /// Global shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Reads output elements `[start, start + count)`; both must be whole rows of dimension 0.
    pub(super) fn read(
        &self,
        inputs: &[Input],
        start: u64,
        count: u64,
        out: &mut [u8],
        bufs: &mut ChunkBuffers,
    ) -> Result<()> {
        let esz = self.dtype.size() as u64;
        let (r0, r1) = (start / self.row, (start + count) / self.row);
        let nd = self.shape.len();
        for c in &self.chunks {
            let (o0, s0) = match nd {
                0 => (0, 1),
                _ => (c.offsets[0], c.sizes[0]),
            };
            let (lo, hi) = (r0.max(o0), r1.min(o0 + s0));
            if lo >= hi {
                continue;
            }
            let local_row = c.sizes.iter().skip(1).product::<u64>().max(1);
            let local_start = (lo - o0) * local_row;
            let local_count = (hi - lo) * local_row;
            if nd <= 1 || c.sizes[1..] == self.shape[1..] {
                // Whole rows: the chunk's rows land contiguously in the output.
                let dst = ((lo * self.row - start) * esz) as usize;
                let len = (local_count * esz) as usize;
                c.view.read(inputs, local_start, local_count, &mut out[dst..dst + len], &mut bufs.window)?;
                continue;
            }
            fit(&mut bufs.rows, (local_count * esz) as usize);
            c.view.read(inputs, local_start, local_count, &mut bufs.rows, &mut bufs.window)?;
            // Scatter runs along the last dimension into their global positions.
            let last = nd - 1;
            let run = c.sizes[last];
            let mut gstride = vec![1u64; nd];
            for d in (0..last).rev() {
                gstride[d] = gstride[d + 1] * self.shape[d + 1];
            }
            let runs = local_count / run;
            let mut idx = vec![0u64; nd];
            idx[0] = lo - o0;
            for k in 0..runs {
                let g: u64 = (0..nd).map(|d| (c.offsets[d] + idx[d]) * gstride[d]).sum();
                let dst = ((g - start) * esz) as usize;
                let src = (k * run * esz) as usize;
                let len = (run * esz) as usize;
                out[dst..dst + len].copy_from_slice(&bufs.rows[src..src + len]);
                for d in (0..last).rev() {
                    idx[d] += 1;
                    if d == 0 || idx[d] < c.sizes[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
        }
        Ok(())
    }

    /// Input ranges that hold output elements `[start, start + count)` verbatim, in order, when every
    /// chunk is a contiguous slab of whole rows (FSDP's `Shard(0)`).
    pub(super) fn verbatim_pieces(&self, start: u64, count: u64) -> Option<Vec<(usize, u64, u64)>> {
        if !self.row_slabs {
            return None;
        }
        let esz = self.dtype.size() as u64;
        let end = start + count;
        let mut pieces = Vec::new();
        for c in &self.chunks {
            let first = c.offsets.first().copied().unwrap_or(0) * self.row;
            let n = c.view.numel();
            let (lo, hi) = (start.max(first), end.min(first + n));
            if lo < hi {
                let v = &c.view;
                pieces.push((v.input, v.data_start + (v.offset + lo - first) * esz, (hi - lo) * esz));
            }
        }
        Some(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether any two boxes overlap, pair by pair (the reference for the grid check).
    fn overlap_brute(boxes: &[(Vec<u64>, Vec<u64>)]) -> bool {
        boxes.iter().enumerate().any(|(i, (a, sa))| {
            boxes[..i].iter().any(|(b, sb)| (0..a.len()).all(|d| a[d] < b[d] + sb[d] && b[d] < a[d] + sa[d]))
        })
    }

    fn tiling(shape: &[u64], boxes: &[(Vec<u64>, Vec<u64>)]) -> Result<()> {
        let refs: Vec<(&[u64], &[u64])> = boxes.iter().map(|(o, s)| (o.as_slice(), s.as_slice())).collect();
        check_tiling("w", shape, &refs)
    }

    #[test]
    fn a_slice_keeps_the_chunks_it_crosses_as_views() -> Result<()> {
        // [2 experts, 4 rows, 3 cols], cut on dim 1 into rows 0..3 and 3..4, each chunk its own storage.
        let chunk = |o1: u64, rows: u64, input: usize| -> Result<Chunk> {
            let view =
                StridedView::new("w", input, 0, 24 * 4, DType::F32, 0, vec![2, rows, 3], vec![rows * 3, 3, 1], 3)?;
            Ok(Chunk { offsets: vec![0, o1, 0], sizes: vec![2, rows, 3], view })
        };
        let t = ChunkedTensor::new("w", vec![2, 4, 3], DType::F32, vec![chunk(0, 3, 0)?, chunk(3, 1, 1)?])?;
        // Expert 1, rows 2..4 (the up half): row 2 of chunk 0 and row 0 of chunk 1.
        let s = t.slice("w", 1, (2, 4))?;
        assert_eq!(s.shape(), &[2, 3]);
        let got: Vec<(Vec<u64>, usize, u64)> =
            s.chunks().iter().map(|c| (c.offsets.clone(), c.view.input, c.view.offset)).collect();
        assert_eq!(got, vec![(vec![0, 0], 0, 9 + 6), (vec![1, 0], 1, 3)]);
        assert!(t.slice("w", 2, (0, 1)).is_err());
        assert!(t.slice("w", 0, (3, 5)).is_err());
        Ok(())
    }

    #[test]
    fn tiling_finds_gaps_overlaps_and_exact_grids() {
        let b = |o: &[u64], s: &[u64]| (o.to_vec(), s.to_vec());
        assert!(tiling(&[6, 4], &[b(&[0, 0], &[6, 2]), b(&[0, 2], &[6, 2])]).is_ok());
        assert!(tiling(&[], &[b(&[], &[])]).is_ok());
        let e = tiling(&[6, 3], &[b(&[0, 0], &[6, 2]), b(&[0, 1], &[6, 2])]).unwrap_err();
        assert!(e.to_string().contains("chunks at [0, 0] and [0, 1] overlap"), "{e}");
        let e = tiling(&[6, 5], &[b(&[0, 0], &[6, 2]), b(&[0, 3], &[6, 2])]).unwrap_err();
        assert!(e.to_string().contains("gap"), "{e}");
        let e = tiling(&[6, 4], &[b(&[0, 0], &[6, 2]), b(&[0, 3], &[6, 2])]).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        // Two copies of one scalar, and an empty chunk that overlaps nothing.
        assert!(tiling(&[], &[b(&[], &[]), b(&[], &[])]).is_err());
        assert!(tiling(&[4], &[b(&[0], &[4]), b(&[2], &[0])]).is_ok());
    }

    #[test]
    fn tiling_agrees_with_the_pairwise_check() {
        // Random boxes in a 5x6x3 tensor, against comparing every pair (a small LCG keeps it deterministic).
        let mut seed = 12345u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let shape = [5u64, 6, 3];
        for _ in 0..2000 {
            let k = 1 + next(5) as usize;
            let boxes: Vec<(Vec<u64>, Vec<u64>)> = (0..k)
                .map(|_| {
                    let off: Vec<u64> = shape.iter().map(|&d| next(d)).collect();
                    let size: Vec<u64> = off.iter().zip(&shape).map(|(&o, &d)| 1 + next(d - o)).collect();
                    (off, size)
                })
                .collect();
            let overlaps = tiling(&shape, &boxes).is_err_and(|e| e.to_string().contains("overlap"));
            assert_eq!(overlaps, overlap_brute(&boxes), "{boxes:?}");
        }
    }

    #[test]
    fn tiling_of_many_chunks_is_not_quadratic() {
        // 200,000 row chunks and a 400x500 grid: comparing every pair would take minutes.
        let rows: Vec<_> = (0..200_000u64).map(|i| (vec![i, 0], vec![1, 8])).collect();
        assert!(tiling(&[200_000, 8], &rows).is_ok());
        let grid: Vec<_> = (0..200_000u64).map(|i| (vec![i / 500, i % 500], vec![1, 1])).collect();
        assert!(tiling(&[400, 500], &grid).is_ok());
        let mut twice = grid.clone();
        twice.push((vec![399, 499], vec![1, 1]));
        assert!(tiling(&[400, 500], &twice).unwrap_err().to_string().contains("overlap"));
        // Chunks whose edges make a million cells are refused, not compared pair by pair.
        let diagonal: Vec<_> = (0..5000u64).map(|i| (vec![i, i], vec![1, 5000 - i])).collect();
        assert_eq!(tiling(&[5000, 5000], &diagonal).unwrap_err().label(), "limit");
        // Fewer such chunks are compared pair by pair.
        let mut few: Vec<_> = (0..100u64).map(|i| (vec![i, i], vec![1, 5000 - i])).collect();
        assert!(tiling(&[5000, 5000], &few).unwrap_err().to_string().contains("gap"));
        few.push((vec![50, 0], vec![1, 51]));
        assert!(
            tiling(&[5000, 5000], &few).unwrap_err().to_string().contains("chunks at [50, 50] and [50, 0] overlap")
        );
    }
}
