//! Candle 0.11.1 `quantized/avx.rs`, vendored, with ult's additions: AVX2 dot products for Q4_1 and Q5_0
//! (upstream runs both through scalar loops; these are ggml's x86 kernels, in its order of operations),
//! each with a four-row variant that shares the activation load, and tile kernels for Q4_1, Q5_0 and
//! Q8_0 (4 activation rows × 2 weight rows, `vpdpbusd` where AVX-512 VNNI is) for prefill and batched
//! steps. All give the bits of ggml's one-row order of operations.
use super::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ6K, BlockQ8K,
    BlockQ8_0, BlockQ8_1, QK8_0, QK8_1, QK_K, TILE_COLS,
};
use byteorder::{ByteOrder, LittleEndian};
use half::f16;

#[cfg(target_arch = "x86")]
use core::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

#[target_feature(enable = "avx2,fma")]
pub(crate) fn sum_i16_pairs_float(x: __m256i) -> __m256 {
    let ones = _mm256_set1_epi16(1);
    let summed_pairs = _mm256_madd_epi16(ones, x);
    _mm256_cvtepi32_ps(summed_pairs)
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn mul_sum_us8_pairs_float(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    sum_i16_pairs_float(dot)
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum_float_8(x: __m256) -> f32 {
    let res = _mm256_extractf128_ps(x, 1);
    let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// # Safety
/// `rsi` must point to at least 16 readable bytes.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn bytes_from_nibbles_32(rsi: *const u8) -> __m256i {
    let tmp = unsafe { _mm_loadu_si128(rsi as *const __m128i) };
    let bytes = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
    let low_mask = _mm256_set1_epi8(0xF);
    _mm256_and_si256(low_mask, bytes)
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn mul_sum_i8_pairs_float(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_sum_us8_pairs_float(ax, sy)
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q4_0_q8_0(n: usize, xs: &[BlockQ4_0], ys: &[BlockQ8_0]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK8_0),
        "vec_dot_q4_0_q8_0: {n} is not divisible by {QK8_0}"
    );
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = _mm256_set1_ps(half1(x.d) * half1(y.d));
            let bx = bytes_from_nibbles_32(x.qs.as_ptr());
            let off = _mm256_set1_epi8(8);
            let bx = _mm256_sub_epi8(bx, off);
            let by = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let q = mul_sum_i8_pairs_float(bx, by);
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum_float_8(acc)
    }
}

/// ggml's `ggml_vec_dot_q4_1_q8_1` for AVX2: the nibbles (0..15) as unsigned bytes against the signed
/// activations, per-block scales fused into one vector accumulator, the min terms summed apart.
/// ult: a block's two f16 fields convert together ([`half_pair`]) and one multiply gives both products,
/// `d·d` in lane 0 (broadcast as the block's scale) and `m·s` in lane 1 (summed in block order, as the
/// scalar `summs` was): the same bits as ggml's order of operations.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q4_1_q8_1(n: usize, xs: &[BlockQ4_1], ys: &[BlockQ8_1]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK8_1),
        "vec_dot_q4_1_q8_1: {n} is not divisible by {QK8_1}"
    );
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut summs = _mm_setzero_ps();
        for (x, y) in xs.iter().zip(ys.iter()) {
            let p = _mm_mul_ps(
                half_pair(x as *const _ as *const u8),
                half_pair(y as *const _ as *const u8),
            );
            summs = _mm_add_ps(summs, p);
            let qx = bytes_from_nibbles_32(x.qs.as_ptr());
            let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let xy = mul_sum_us8_pairs_float(qx, qy);
            acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(p), xy, acc);
        }
        hsum_float_8(acc) + lane1(summs)
    }
}

/// `h` as f32, converted from a fresh register (`vmovd`, `vcvtph2ps`): the half crate's conversion
/// inserts into a live register, which chains every block's conversions behind each other.
#[inline(always)]
fn half1(h: f16) -> f32 {
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32))) }
}

/// Lane 1 of `v`.
#[inline(always)]
fn lane1(v: __m128) -> f32 {
    let mut m = [0f32; 4];
    unsafe { _mm_storeu_ps(m.as_mut_ptr(), v) };
    m[1]
}

/// Four rows of Q4_1 weights against one row of activations: `vec_dot_q4_1_q8_1` of each, in exactly its
/// order of operations per row (so the results are the same bits), with the activations' load and
/// scales shared and four independent accumulators in flight.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_4_q4_1_q8_1(n: usize, xs: [&[BlockQ4_1]; 4], ys: &[BlockQ8_1]) -> [f32; 4] {
    debug_assert!(
        n.is_multiple_of(QK8_1),
        "vec_dot_4_q4_1_q8_1: {n} is not divisible by {QK8_1}"
    );
    let nb = ys.len().min(xs.iter().map(|x| x.len()).min().unwrap_or(0));
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [_mm_setzero_ps(); 4];
        for ib in 0..nb {
            let y = ys.get_unchecked(ib);
            let yds = half_pair(y as *const _ as *const u8);
            let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            for r in 0..4 {
                let x = xs[r].get_unchecked(ib);
                let p = _mm_mul_ps(half_pair(x as *const _ as *const u8), yds);
                summs[r] = _mm_add_ps(summs[r], p);
                let qx = bytes_from_nibbles_32(x.qs.as_ptr());
                let xy = mul_sum_us8_pairs_float(qx, qy);
                acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(p), xy, acc[r]);
            }
        }
        [
            hsum_float_8(acc[0]) + lane1(summs[0]),
            hsum_float_8(acc[1]) + lane1(summs[1]),
            hsum_float_8(acc[2]) + lane1(summs[2]),
            hsum_float_8(acc[3]) + lane1(summs[3]),
        ]
    }
}

/// ult: up to `TILE_ROWS` activation rows against `TILE_COLS` Q4_1 weight rows at once, for prefill
/// and batched steps. Every (row, column) result takes exactly `vec_dot_q4_1_q8_1`'s operations in its
/// order (the same 8-lane accumulator, the min terms summed in block order, then `hsum_float_8`), so a
/// sequence's logits do not depend on how many rows its step has; what is shared is the work that does
/// not touch the result: unpacking a weight block's nibbles, loading and converting an activation block.
/// `VNNI` sums the byte products with one `vpdpbusd`, which gives the same integers as
/// `maddubs` + `madd` (a pair of nibble-by-byte products never saturates 16 bits).
#[inline(always)]
unsafe fn tile_q4_1_q8_1<const R: usize, const VNNI: bool>(
    xs: [&[BlockQ4_1]; TILE_COLS],
    ys: [&[BlockQ8_1]; R],
) -> [[f32; TILE_COLS]; R] {
    debug_assert_eq!(TILE_COLS, 2);
    let nb = xs
        .iter()
        .map(|x| x.len())
        .chain(ys.iter().map(|y| y.len()))
        .min()
        .unwrap_or(0);
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); TILE_COLS]; R];
        // Lanes 2 and 3: the scalar `summs += m·s` of columns 0 and 1, in the same order.
        let mut summs = [_mm_setzero_ps(); R];
        for ib in 0..nb {
            let (x0, x1) = (xs[0].get_unchecked(ib), xs[1].get_unchecked(ib));
            let qx = [
                bytes_from_nibbles_32(x0.qs.as_ptr()),
                bytes_from_nibbles_32(x1.qs.as_ptr()),
            ];
            // [d0, d1, m0, m1]
            let dm = _mm_unpacklo_ps(
                half_pair(x0 as *const _ as *const u8),
                half_pair(x1 as *const _ as *const u8),
            );
            for r in 0..R {
                let y = ys[r].get_unchecked(ib);
                let yds = half_pair(y as *const _ as *const u8); // [d, s, 0, 0]
                let yd = _mm_shuffle_ps::<0b0000_0000>(yds, yds);
                let ysum = _mm_shuffle_ps::<0b0101_0101>(yds, yds);
                summs[r] = _mm_add_ps(summs[r], _mm_mul_ps(dm, ysum));
                // [d0·d, d1·d, ..]: each the product `_mm256_mul_ps` of the two broadcasts gives.
                let d0d1 = _mm_mul_ps(dm, yd);
                let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                let scales = [
                    _mm256_broadcastss_ps(d0d1),
                    _mm256_broadcastss_ps(_mm_movehdup_ps(d0d1)),
                ];
                for c in 0..TILE_COLS {
                    let xy = if VNNI {
                        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), qx[c], qy))
                    } else {
                        mul_sum_us8_pairs_float(qx[c], qy)
                    };
                    acc[r][c] = _mm256_fmadd_ps(scales[c], xy, acc[r][c]);
                }
            }
        }
        let mut out = [[0f32; TILE_COLS]; R];
        for r in 0..R {
            let mut m = [0f32; 4];
            _mm_storeu_ps(m.as_mut_ptr(), summs[r]);
            for c in 0..TILE_COLS {
                out[r][c] = hsum_float_8(acc[r][c]) + m[2 + c];
            }
        }
        out
    }
}

/// ult, AVX2: up to `TILE_ROWS` activation rows against `TILE_COLS` weight rows of signed bytes (Q5_0's
/// 5-bit values, Q8_0's bytes) with one f16 scale per block, at once; each (row, column) in
/// `vec_dot_q5_0_q8_0`'s / `vec_dot_q8_0_q8_0`'s order of operations (the same bits): a weight block's
/// bytes and their magnitudes are built once for all rows; the sign transfer, which depends on both
/// sides, stays per pair. (AVX-512 VNNI takes [`tile_offset_q8_0`] instead.)
#[inline(always)]
unsafe fn tile_signed_q8_0<X, const R: usize>(
    xs: [&[X]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
    bytes: impl Fn(&X) -> (__m256i, f16),
) -> [[f32; TILE_COLS]; R] {
    let nb = xs
        .iter()
        .map(|x| x.len())
        .chain(ys.iter().map(|y| y.len()))
        .min()
        .unwrap_or(0);
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); TILE_COLS]; R];
        for ib in 0..nb {
            let mut qx = [_mm256_setzero_si256(); TILE_COLS];
            let mut ax = [_mm256_setzero_si256(); TILE_COLS];
            let mut xd = [0f32; TILE_COLS];
            for c in 0..TILE_COLS {
                let (q, d) = bytes(xs[c].get_unchecked(ib));
                qx[c] = q;
                ax[c] = _mm256_sign_epi8(q, q);
                xd[c] = half1(d);
            }
            for r in 0..R {
                let y = ys[r].get_unchecked(ib);
                let yd = half1(y.d);
                let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                for c in 0..TILE_COLS {
                    let d = _mm256_set1_ps(xd[c] * yd);
                    let sy = _mm256_sign_epi8(qy, qx[c]);
                    let q = mul_sum_us8_pairs_float(ax[c], sy);
                    acc[r][c] = _mm256_fmadd_ps(d, q, acc[r][c]);
                }
            }
        }
        let mut out = [[0f32; TILE_COLS]; R];
        for r in 0..R {
            for c in 0..TILE_COLS {
                out[r][c] = hsum_float_8(acc[r][c]);
            }
        }
        out
    }
}

/// [`tile_signed_q8_0`] for Q5_0 weights.
#[inline(always)]
unsafe fn tile_q5_0_q8_0<const R: usize>(
    xs: [&[BlockQ5_0]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe { tile_signed_q8_0::<_, R>(xs, ys, |x| (q5_0_bytes(x), x.d)) }
}

/// [`tile_signed_q8_0`] for Q8_0 weights.
#[inline(always)]
unsafe fn tile_q8_0_q8_0<const R: usize>(
    xs: [&[BlockQ8_0]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe {
        tile_signed_q8_0::<_, R>(xs, ys, |x| {
            (_mm256_loadu_si256(x.qs.as_ptr() as *const __m256i), x.d)
        })
    }
}

/// [`tile_q8_0_q8_0`] for `R` rows on AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn tile_q8_0_q8_0_avx2<const R: usize>(
    xs: [&[BlockQ8_0]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe { tile_q8_0_q8_0::<R>(xs, ys) }
}

/// [`tile_q8_0_q8_0`] for `R` rows on AVX-512 VNNI.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
pub(crate) fn tile_q8_0_q8_0_vnni<const R: usize>(
    xs: [&[BlockQ8_0]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe {
        tile_offset_q8_0::<_, R, 128>(xs, ys, |x| {
            let w = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
            (_mm256_xor_si256(w, _mm256_set1_epi8(-128)), x.d)
        })
    }
}

/// ult, AVX-512 VNNI: [`tile_signed_q8_0`]'s results (the same bits) with one instruction per (row,
/// column) for the integer part. The weights come offset by `K` into unsigned bytes (`w + K`), and
/// `vpdpbusd` starts each pair's lanes from `-K·Σy` over the lane's four activations (computed once per
/// activation block), so it yields `Σ w·y` of the same four products that `maddubs` + `madd` sum, as
/// exact integers; the block scale is the lane-wise product of the two broadcast scales.
#[inline(always)]
unsafe fn tile_offset_q8_0<X, const R: usize, const K: i32>(
    xs: [&[X]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
    offset_bytes: impl Fn(&X) -> (__m256i, f16),
) -> [[f32; TILE_COLS]; R] {
    let nb = xs
        .iter()
        .map(|x| x.len())
        .chain(ys.iter().map(|y| y.len()))
        .min()
        .unwrap_or(0);
    unsafe {
        let k_bytes = _mm256_set1_epi8(K as u8 as i8);
        let mut acc = [[_mm256_setzero_ps(); TILE_COLS]; R];
        for ib in 0..nb {
            let mut ux = [_mm256_setzero_si256(); TILE_COLS];
            let mut xd = [_mm256_setzero_ps(); TILE_COLS];
            for c in 0..TILE_COLS {
                let (u, d) = offset_bytes(xs[c].get_unchecked(ib));
                ux[c] = u;
                xd[c] = _mm256_set1_ps(half1(d));
            }
            for r in 0..R {
                let y = ys[r].get_unchecked(ib);
                let yd = _mm256_set1_ps(half1(y.d));
                let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                let start = _mm256_sub_epi32(
                    _mm256_setzero_si256(),
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), k_bytes, qy),
                );
                for c in 0..TILE_COLS {
                    let q = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, ux[c], qy));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(xd[c], yd), q, acc[r][c]);
                }
            }
        }
        let mut out = [[0f32; TILE_COLS]; R];
        for r in 0..R {
            for c in 0..TILE_COLS {
                out[r][c] = hsum_float_8(acc[r][c]);
            }
        }
        out
    }
}

/// [`tile_q5_0_q8_0`] for `R` rows on AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn tile_q5_0_q8_0_avx2<const R: usize>(
    xs: [&[BlockQ5_0]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe { tile_q5_0_q8_0::<R>(xs, ys) }
}

/// [`tile_q5_0_q8_0`] for `R` rows on AVX-512 VNNI.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
pub(crate) fn tile_q5_0_q8_0_vnni<const R: usize>(
    xs: [&[BlockQ5_0]; TILE_COLS],
    ys: [&[BlockQ8_0]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe {
        tile_offset_q8_0::<_, R, 16>(xs, ys, |x| {
            (_mm256_add_epi8(q5_0_bytes(x), _mm256_set1_epi8(16)), x.d)
        })
    }
}

/// The two f16 values at `p` (a block's scale and its second field) as `[a, b, 0, 0]`, converted from a
/// fresh register: unlike a lane insert, nothing waits on an earlier value of the register.
///
/// # Safety
/// `p` must point to at least 4 readable bytes.
#[inline(always)]
unsafe fn half_pair(p: *const u8) -> __m128 {
    unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32))) }
}

/// [`tile_q4_1_q8_1`] for `R` rows (1 to `TILE_ROWS`) on AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn tile_q4_1_q8_1_avx2<const R: usize>(
    xs: [&[BlockQ4_1]; TILE_COLS],
    ys: [&[BlockQ8_1]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe { tile_q4_1_q8_1::<R, false>(xs, ys) }
}

/// [`tile_q4_1_q8_1`] for `R` rows on AVX-512 VNNI (with VL: 32 vector registers, `vpdpbusd` on 256 bits).
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
pub(crate) fn tile_q4_1_q8_1_vnni<const R: usize>(
    xs: [&[BlockQ4_1]; TILE_COLS],
    ys: [&[BlockQ8_1]; R],
) -> [[f32; TILE_COLS]; R] {
    unsafe { tile_q4_1_q8_1::<R, true>(xs, ys) }
}

/// ggml's `bytes_from_bits_32`: byte i is 0xFF where bit i of the 32 bits at `x` is set, else 0.
///
/// # Safety
/// `x` must point to at least 4 readable bytes.
#[target_feature(enable = "avx2,fma")]
unsafe fn bytes_from_bits_32(x: *const u8) -> __m256i {
    let x32 = unsafe { std::ptr::read_unaligned(x as *const u32) } as i32;
    let shuf_mask = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf_mask);
    let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let bytes = _mm256_or_si256(bytes, bit_mask);
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// A Q5_0 block's 32 weights as signed bytes (the nibble plus its fifth bit, minus 16), as ggml builds
/// them.
///
/// # Safety
/// `x` must be a valid block.
#[target_feature(enable = "avx2,fma")]
unsafe fn q5_0_bytes(x: &BlockQ5_0) -> __m256i {
    let qx = unsafe { bytes_from_nibbles_32(x.qs.as_ptr()) };
    let bxhi = unsafe { bytes_from_bits_32(x.qh.as_ptr()) };
    let bxhi = _mm256_andnot_si256(bxhi, _mm256_set1_epi8(0xF0u8 as i8));
    _mm256_or_si256(qx, bxhi)
}

/// ggml's `ggml_vec_dot_q5_0_q8_0` for AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q5_0_q8_0(n: usize, xs: &[BlockQ5_0], ys: &[BlockQ8_0]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK8_0),
        "vec_dot_q5_0_q8_0: {n} is not divisible by {QK8_0}"
    );
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = _mm256_set1_ps(half1(x.d) * half1(y.d));
            let qx = q5_0_bytes(x);
            let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let q = mul_sum_i8_pairs_float(qx, qy);
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum_float_8(acc)
    }
}

/// Four rows of Q5_0 weights against one row of activations, each in `vec_dot_q5_0_q8_0`'s order of
/// operations (the same bits), the activations loaded once per block.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_4_q5_0_q8_0(n: usize, xs: [&[BlockQ5_0]; 4], ys: &[BlockQ8_0]) -> [f32; 4] {
    debug_assert!(
        n.is_multiple_of(QK8_0),
        "vec_dot_4_q5_0_q8_0: {n} is not divisible by {QK8_0}"
    );
    let nb = ys.len().min(xs.iter().map(|x| x.len()).min().unwrap_or(0));
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for ib in 0..nb {
            let y = ys.get_unchecked(ib);
            let yd = half1(y.d);
            let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            for r in 0..4 {
                let x = xs[r].get_unchecked(ib);
                let d = _mm256_set1_ps(half1(x.d) * yd);
                let q = mul_sum_i8_pairs_float(q5_0_bytes(x), qy);
                acc[r] = _mm256_fmadd_ps(d, q, acc[r]);
            }
        }
        [
            hsum_float_8(acc[0]),
            hsum_float_8(acc[1]),
            hsum_float_8(acc[2]),
            hsum_float_8(acc[3]),
        ]
    }
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q8_0_q8_0(n: usize, xs: &[BlockQ8_0], ys: &[BlockQ8_0]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK8_0),
        "vec_dot_q8_0_q8_0: {n} is not divisible by {QK8_0}"
    );
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = _mm256_set1_ps(half1(x.d) * half1(y.d));
            let bx = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
            let by = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let q = mul_sum_i8_pairs_float(bx, by);
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum_float_8(acc)
    }
}

/// # Safety
/// `i` must be less than 8.
#[target_feature(enable = "avx2,fma")]
unsafe fn get_scale_shuffle(i: usize) -> __m128i {
    const K_SHUFFLE: [u8; 128] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7,
        7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10,
        11, 11, 11, 11, 11, 11, 11, 11, 12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13,
        13, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15,
    ];
    unsafe { _mm_loadu_si128((K_SHUFFLE.as_ptr() as *const __m128i).add(i)) }
}

/// # Safety
/// `i` must be less than 8.
#[target_feature(enable = "avx2,fma")]
unsafe fn get_scale_shuffle_k4(i: usize) -> __m256i {
    const K_SHUFFLE: [u8; 256] = [
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
        0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
        2, 3, 2, 3, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5,
        4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7,
        6, 7, 6, 7, 6, 7, 6, 7, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9,
        8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10,
        11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 12, 13, 12, 13, 12, 13,
        12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12,
        13, 12, 13, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15,
        14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15,
    ];
    unsafe { _mm256_loadu_si256((K_SHUFFLE.as_ptr() as *const __m256i).add(i)) }
}

/// # Safety
/// `i` must be less than 4.
#[target_feature(enable = "avx2,fma")]
unsafe fn get_scale_shuffle_q3k(i: usize) -> __m256i {
    const K_SHUFFLE: [u8; 128] = [
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
        2, 3, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7,
        6, 7, 6, 7, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11,
        10, 11, 10, 11, 10, 11, 10, 11, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12,
        13, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15,
    ];
    unsafe { _mm256_loadu_si256((K_SHUFFLE.as_ptr() as *const __m256i).add(i)) }
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q6k_q8k(n: usize, xs: &[BlockQ6K], ys: &[BlockQ8K]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK_K),
        "vec_dot_q6k_8k: {n} is not divisible by {QK_K}"
    );

    unsafe {
        let m4 = _mm256_set1_epi8(0xF);
        let m2 = _mm256_set1_epi8(3);
        let m32s = _mm256_set1_epi8(32);
        let mut acc = _mm256_setzero_ps();
        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = y.d * half1(x.d);
            let mut q4 = x.ql.as_ptr();
            let mut qh = x.qh.as_ptr();
            let mut q8 = y.qs.as_ptr();

            let scales = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
            let mut sumi = _mm256_setzero_si256();

            for j in 0..QK_K / 128 {
                let is = j * 4;
                let scale_0 = _mm_shuffle_epi8(scales, get_scale_shuffle(is));
                let scale_1 = _mm_shuffle_epi8(scales, get_scale_shuffle(is + 1));
                let scale_2 = _mm_shuffle_epi8(scales, get_scale_shuffle(is + 2));
                let scale_3 = _mm_shuffle_epi8(scales, get_scale_shuffle(is + 3));

                let q4bits1 = _mm256_loadu_si256(q4 as *const __m256i);
                q4 = q4.add(32);
                let q4bits2 = _mm256_loadu_si256(q4 as *const __m256i);
                q4 = q4.add(32);
                let q4bits_h = _mm256_loadu_si256(qh as *const __m256i);
                qh = qh.add(32);

                let q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, m2), 4);
                let q4h_1 =
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 2), m2), 4);
                let q4h_2 =
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 4), m2), 4);
                let q4h_3 =
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 6), m2), 4);

                let q4_0 = _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0);
                let q4_1 = _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1);
                let q4_2 =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m4), q4h_2);
                let q4_3 =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m4), q4h_3);

                let q8_0 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_1 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_2 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_3 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);

                let q8s_0 = _mm256_maddubs_epi16(m32s, q8_0);
                let q8s_1 = _mm256_maddubs_epi16(m32s, q8_1);
                let q8s_2 = _mm256_maddubs_epi16(m32s, q8_2);
                let q8s_3 = _mm256_maddubs_epi16(m32s, q8_3);

                let p16_0 = _mm256_maddubs_epi16(q4_0, q8_0);
                let p16_1 = _mm256_maddubs_epi16(q4_1, q8_1);
                let p16_2 = _mm256_maddubs_epi16(q4_2, q8_2);
                let p16_3 = _mm256_maddubs_epi16(q4_3, q8_3);

                let p16_0 = _mm256_sub_epi16(p16_0, q8s_0);
                let p16_1 = _mm256_sub_epi16(p16_1, q8s_1);
                let p16_2 = _mm256_sub_epi16(p16_2, q8s_2);
                let p16_3 = _mm256_sub_epi16(p16_3, q8s_3);

                let p16_0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_0), p16_0);
                let p16_1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_1), p16_1);
                let p16_2 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_2), p16_2);
                let p16_3 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_3), p16_3);

                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_0, p16_1));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_2, p16_3));
            }
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_float_8(acc)
    }
}

#[target_feature(enable = "avx2,fma")]
fn mm256_set_m128i(a: __m128i, b: __m128i) -> __m256i {
    _mm256_insertf128_si256(_mm256_castsi128_si256(b), a, 1)
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q2k_q8k(n: usize, xs: &[BlockQ2K], ys: &[BlockQ8K]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK_K),
        "vec_dot_q2k_q8k: {n} is not divisible by {QK_K}"
    );

    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(0xF);

        let mut acc = _mm256_setzero_ps();

        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = y.d * half1(x.d);
            let dmin = -y.d * half1(x.dmin);

            let mut q2 = x.qs.as_ptr();
            let mut q8 = y.qs.as_ptr();

            let mins_and_scales = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
            let scales8 = _mm_and_si128(mins_and_scales, m4);
            let mins8 = _mm_and_si128(_mm_srli_epi16(mins_and_scales, 4), m4);
            let mins = _mm256_cvtepi8_epi16(mins8);
            let prod =
                _mm256_madd_epi16(mins, _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i));

            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&dmin), _mm256_cvtepi32_ps(prod), acc);

            let all_scales = _mm256_cvtepi8_epi16(scales8);
            let l_scales = _mm256_extracti128_si256(all_scales, 0);
            let h_scales = _mm256_extracti128_si256(all_scales, 1);
            let scales = [
                mm256_set_m128i(l_scales, l_scales),
                mm256_set_m128i(h_scales, h_scales),
            ];

            let mut sumi = _mm256_setzero_si256();

            for scale in scales {
                let q2bits = _mm256_loadu_si256(q2 as *const __m256i);
                q2 = q2.add(32);

                let q8_0 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_1 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_2 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_3 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);

                let q2_0 = _mm256_and_si256(q2bits, m3);
                let q2_1 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 2), m3);
                let q2_2 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 4), m3);
                let q2_3 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 6), m3);

                let p0 = _mm256_maddubs_epi16(q2_0, q8_0);
                let p1 = _mm256_maddubs_epi16(q2_1, q8_1);
                let p2 = _mm256_maddubs_epi16(q2_2, q8_2);
                let p3 = _mm256_maddubs_epi16(q2_3, q8_3);

                let p0 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(scale, get_scale_shuffle_q3k(0)), p0);
                let p1 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(scale, get_scale_shuffle_q3k(1)), p1);
                let p2 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(scale, get_scale_shuffle_q3k(2)), p2);
                let p3 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(scale, get_scale_shuffle_q3k(3)), p3);

                let p0 = _mm256_add_epi32(p0, p1);
                let p2 = _mm256_add_epi32(p2, p3);

                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p2));
            }
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi), acc);
        }

        hsum_float_8(acc)
    }
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q3k_q8k(n: usize, xs: &[BlockQ3K], ys: &[BlockQ8K]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK_K),
        "vec_dot_q3k_q8k: {n} is not divisible by {QK_K}"
    );

    const KMASK1: u32 = 0x03030303;
    const KMASK2: u32 = 0x0f0f0f0f;

    let mut aux = [0u32; 3];

    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let mone = _mm256_set1_epi8(1);
        let m32 = _mm_set1_epi8(32);

        let mut acc = _mm256_setzero_ps();
        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = y.d * half1(x.d);

            let mut q3 = x.qs.as_ptr();
            let mut q8 = y.qs.as_ptr();

            LittleEndian::read_u32_into(&x.scales, &mut aux);
            let scales128 = _mm_set_epi32(
                (((aux[1] >> 4) & KMASK2) | (((aux[2] >> 6) & KMASK1) << 4)) as i32,
                (((aux[0] >> 4) & KMASK2) | (((aux[2] >> 4) & KMASK1) << 4)) as i32,
                ((aux[1] & KMASK2) | (((aux[2] >> 2) & KMASK1) << 4)) as i32,
                ((aux[0] & KMASK2) | (((aux[2]) & KMASK1) << 4)) as i32,
            );
            let scales128 = _mm_sub_epi8(scales128, m32);
            let all_scales = _mm256_cvtepi8_epi16(scales128);
            let l_scales = _mm256_extracti128_si256(all_scales, 0);
            let h_scales = _mm256_extracti128_si256(all_scales, 1);
            let scales = [
                mm256_set_m128i(l_scales, l_scales),
                mm256_set_m128i(h_scales, h_scales),
            ];

            // high bit
            let hbits = _mm256_loadu_si256(x.hmask.as_ptr() as *const __m256i);

            let mut sumi = _mm256_setzero_si256();

            for (j, scale) in scales.iter().enumerate() {
                // load low 2 bits
                let q3bits = _mm256_loadu_si256(q3 as *const __m256i);
                q3 = q3.add(32);

                // Prepare low and high bits
                // We hardcode the shifts here to avoid loading them into a separate register
                let q3l_0 = _mm256_and_si256(q3bits, m3);
                let q3h_0 = if j == 0 {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 0)), 0)
                } else {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 4)), 4)
                };
                let q3h_0 = _mm256_slli_epi16(q3h_0, 2);

                let q3l_1 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 2), m3);
                let q3h_1 = if j == 0 {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 1)), 1)
                } else {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 5)), 5)
                };
                let q3h_1 = _mm256_slli_epi16(q3h_1, 2);

                let q3l_2 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 4), m3);
                let q3h_2 = if j == 0 {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 2)), 2)
                } else {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 6)), 6)
                };
                let q3h_2 = _mm256_slli_epi16(q3h_2, 2);

                let q3l_3 = _mm256_and_si256(_mm256_srli_epi16(q3bits, 6), m3);
                let q3h_3 = if j == 0 {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 3)), 3)
                } else {
                    _mm256_srli_epi16(_mm256_andnot_si256(hbits, _mm256_slli_epi16(mone, 7)), 7)
                };
                let q3h_3 = _mm256_slli_epi16(q3h_3, 2);

                // load Q8 quants
                let q8_0 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_1 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_2 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_3 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);

                // Dot product: we multiply the 2 low bits and 1 high bit part separately, so we
                // can use _mm256_maddubs_epi16, and then subtract. The high bit part has the 2
                // already subtracted (and so, it is zero if the high bit was not set, and 2 if the
                // high bit was set)
                let q8s_0 = _mm256_maddubs_epi16(q3h_0, q8_0);
                let q8s_1 = _mm256_maddubs_epi16(q3h_1, q8_1);
                let q8s_2 = _mm256_maddubs_epi16(q3h_2, q8_2);
                let q8s_3 = _mm256_maddubs_epi16(q3h_3, q8_3);

                let p16_0 = _mm256_maddubs_epi16(q3l_0, q8_0);
                let p16_1 = _mm256_maddubs_epi16(q3l_1, q8_1);
                let p16_2 = _mm256_maddubs_epi16(q3l_2, q8_2);
                let p16_3 = _mm256_maddubs_epi16(q3l_3, q8_3);

                let p16_0 = _mm256_sub_epi16(p16_0, q8s_0);
                let p16_1 = _mm256_sub_epi16(p16_1, q8s_1);
                let p16_2 = _mm256_sub_epi16(p16_2, q8s_2);
                let p16_3 = _mm256_sub_epi16(p16_3, q8s_3);

                // multiply with scales
                let p16_0 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(*scale, get_scale_shuffle_q3k(0)), p16_0);
                let p16_1 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(*scale, get_scale_shuffle_q3k(1)), p16_1);
                let p16_2 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(*scale, get_scale_shuffle_q3k(2)), p16_2);
                let p16_3 =
                    _mm256_madd_epi16(_mm256_shuffle_epi8(*scale, get_scale_shuffle_q3k(3)), p16_3);

                // accumulate
                let p16_0 = _mm256_add_epi32(p16_0, p16_1);
                let p16_2 = _mm256_add_epi32(p16_2, p16_3);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_0, p16_2));
            }

            // multiply with block scale and accumulate
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_float_8(acc)
    }
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q4k_q8k(n: usize, xs: &[BlockQ4K], ys: &[BlockQ8K]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK_K),
        "vec_dot_q4k_q8k: {n} is not divisible by {QK_K}"
    );
    let mut utmp = [0u32; 4];
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;

    unsafe {
        let m4 = _mm256_set1_epi8(0xF);

        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();

        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = y.d * half1(x.d);
            let dmin = -y.d * half1(x.dmin);

            LittleEndian::read_u32_into(&x.scales, &mut utmp[0..3]);

            utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
            let uaux = utmp[1] & KMASK1;
            utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
            utmp[2] = uaux;
            utmp[0] &= KMASK1;

            let mut q4 = x.qs.as_ptr();
            let mut q8 = y.qs.as_ptr();

            let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
                utmp[3] as i32,
                utmp[2] as i32,
                utmp[1] as i32,
                utmp[0] as i32,
            ));

            let q8sums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let q8s = _mm_hadd_epi16(
                _mm256_extracti128_si256(q8sums, 0),
                _mm256_extracti128_si256(q8sums, 1),
            );
            let prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

            let sc128 = _mm256_extracti128_si256(mins_and_scales, 0);
            let scales = mm256_set_m128i(sc128, sc128);

            let mut sumi = _mm256_setzero_si256();

            for j in 0..QK_K / 64 {
                let scale_l = _mm256_shuffle_epi8(scales, get_scale_shuffle_k4(2 * j));
                let scale_h = _mm256_shuffle_epi8(scales, get_scale_shuffle_k4(2 * j + 1));

                let q4bits = _mm256_loadu_si256(q4 as *const __m256i);
                q4 = q4.add(32);
                let q4l = _mm256_and_si256(q4bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);

                let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let p16l = _mm256_maddubs_epi16(q4l, q8l);
                let p16l = _mm256_madd_epi16(scale_l, p16l);
                sumi = _mm256_add_epi32(sumi, p16l);

                let q8h = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let p16h = _mm256_maddubs_epi16(q4h, q8h);
                let p16h = _mm256_madd_epi16(scale_h, p16h);
                sumi = _mm256_add_epi32(sumi, p16h);
            }

            let vd = _mm256_set1_ps(d);
            acc = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(sumi), acc);
        }

        let acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        let acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));

        hsum_float_8(acc) + _mm_cvtss_f32(acc_m)
    }
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q5k_q8k(n: usize, xs: &[BlockQ5K], ys: &[BlockQ8K]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK_K),
        "vec_dot_q5k_q8k: {n} is not divisible by {QK_K}"
    );
    let mut utmp = [0u32; 4];
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;

    unsafe {
        let m4 = _mm256_set1_epi8(0xF);
        let mzero = _mm_setzero_si128();
        let mone = _mm256_set1_epi8(1);

        let mut acc = _mm256_setzero_ps();
        let mut summs = 0.0;

        for (x, y) in xs.iter().zip(ys.iter()) {
            let d = y.d * half1(x.d);
            let dmin = -y.d * half1(x.dmin);

            LittleEndian::read_u32_into(&x.scales, &mut utmp[0..3]);

            utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
            let uaux = utmp[1] & KMASK1;
            utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
            utmp[2] = uaux;
            utmp[0] &= KMASK1;

            let mut q5 = x.qs.as_ptr();
            let mut q8 = y.qs.as_ptr();

            let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
                utmp[3] as i32,
                utmp[2] as i32,
                utmp[1] as i32,
                utmp[0] as i32,
            ));

            let q8sums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let q8s = _mm_hadd_epi16(
                _mm256_extracti128_si256(q8sums, 0),
                _mm256_extracti128_si256(q8sums, 1),
            );
            let prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
            let hsum = _mm_hadd_epi32(_mm_hadd_epi32(prod, mzero), mzero);
            summs += dmin * _mm_extract_epi32(hsum, 0) as f32;

            let sc128 = _mm256_extracti128_si256(mins_and_scales, 0);
            let scales = mm256_set_m128i(sc128, sc128);

            let hbits = _mm256_loadu_si256(x.qh.as_ptr() as *const __m256i);
            let mut hmask = mone;

            let mut sumi = _mm256_setzero_si256();

            for j in 0..QK_K / 64 {
                let scale_0 = _mm256_shuffle_epi8(scales, get_scale_shuffle_k4(2 * j));
                let scale_1 = _mm256_shuffle_epi8(scales, get_scale_shuffle_k4(2 * j + 1));

                let q5bits = _mm256_loadu_si256(q5 as *const __m256i);
                q5 = q5.add(32);

                //Similar to q3k we hardcode the shifts here to avoid loading them into a separate register
                let q5l_0 = _mm256_and_si256(q5bits, m4);
                let q5l_0_shift_input = _mm256_and_si256(hbits, hmask);
                let q5l_0_right_shift = match j {
                    0 => _mm256_srli_epi16(q5l_0_shift_input, 0),
                    1 => _mm256_srli_epi16(q5l_0_shift_input, 2),
                    2 => _mm256_srli_epi16(q5l_0_shift_input, 4),
                    3 => _mm256_srli_epi16(q5l_0_shift_input, 6),
                    _ => unreachable!(),
                };
                let q5h_0 = _mm256_slli_epi16(q5l_0_right_shift, 4);
                let q5_0 = _mm256_add_epi8(q5l_0, q5h_0);
                hmask = _mm256_slli_epi16(hmask, 1);

                let q5l_1 = _mm256_and_si256(_mm256_srli_epi16(q5bits, 4), m4);
                let q5l_1_shift_input = _mm256_and_si256(hbits, hmask);
                let q5l_1_right_shift = match j {
                    0 => _mm256_srli_epi16(q5l_1_shift_input, 1),
                    1 => _mm256_srli_epi16(q5l_1_shift_input, 3),
                    2 => _mm256_srli_epi16(q5l_1_shift_input, 5),
                    3 => _mm256_srli_epi16(q5l_1_shift_input, 7),
                    _ => unreachable!(),
                };

                let q5h_1 = _mm256_slli_epi16(q5l_1_right_shift, 4);
                let q5_1 = _mm256_add_epi8(q5l_1, q5h_1);
                hmask = _mm256_slli_epi16(hmask, 1);

                let q8_0 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let q8_1 = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);

                let p16_0 = _mm256_maddubs_epi16(q5_0, q8_0);
                let p16_1 = _mm256_maddubs_epi16(q5_1, q8_1);

                let p16_0 = _mm256_madd_epi16(scale_0, p16_0);
                let p16_1 = _mm256_madd_epi16(scale_1, p16_1);

                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_0, p16_1));
            }
            let vd = _mm256_set1_ps(d);
            acc = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_float_8(acc) + summs
    }
}

#[target_feature(enable = "avx2,fma")]
pub(crate) fn vec_dot_q8k_q8k(n: usize, xs: &[BlockQ8K], ys: &[BlockQ8K]) -> f32 {
    debug_assert!(
        n.is_multiple_of(QK_K),
        "vec_dot_q8k_8k: {n} is not divisible by {QK_K}"
    );
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (xs, ys) in xs.iter().zip(ys.iter()) {
            let mut sumi = _mm256_setzero_si256();
            let x_qs = xs.qs.as_ptr();
            let y_qs = ys.qs.as_ptr();
            for j in (0..QK_K).step_by(32) {
                let xs = _mm256_loadu_si256(x_qs.add(j) as *const __m256i);
                let ys = _mm256_loadu_si256(y_qs.add(j) as *const __m256i);

                let xs0 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xs, 0));
                let ys0 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(ys, 0));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(xs0, ys0));

                let xs1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xs, 1));
                let ys1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(ys, 1));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(xs1, ys1));
            }
            let d = _mm256_set1_ps(xs.d * ys.d);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_float_8(acc)
    }
}
