//! Predicts the weight copies Candle 0.11.1 builds lazily on x86 CPUs: on the first matmul it repacks
//! some quantized tensors into tiles for its AVX-512/VNNI kernels and keeps the copy beside the original.
//! The conditions and tile sizes mirror `candle-core/src/quantized/repack_x86.rs` (`select`, `TileQ4K`,
//! `TileQ6K`, `TileQ8_0`); the measured ledger catches anything this misses (for example AMX tiles).

use candle_core::quantized::GgmlDType;

/// The SIMD level Candle's x86 repacking would pick on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X86Level {
    /// No repacking (not x86, or no AVX2/FMA).
    None,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-VNNI or AVX-512 VNNI.
    Vnni,
}

/// Detects the level at run time, as Candle does.
pub fn x86_level() -> X86Level {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni");
        let vnni256 = is_x86_feature_detected!("avxvnni") && is_x86_feature_detected!("avx2");
        if vnni512 || vnni256 {
            return X86Level::Vnni;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return X86Level::Avx2;
        }
    }
    X86Level::None
}

const TILE_N: usize = 16;
const QK_K: usize = 256;

/// Extra bytes Candle keeps for a `(n, k)` weight of `dtype` once prefill (m > 1) and decode (m = 1)
/// have both run.
pub fn extra_bytes(level: X86Level, dtype: GgmlDType, n: usize, k: usize) -> u64 {
    if level == X86Level::None || k == 0 || !n.is_multiple_of(TILE_N) || !k.is_multiple_of(QK_K) {
        return 0;
    }
    let tiles = (n / TILE_N) * (k / QK_K);
    let bytes = match dtype {
        // scales + mins (8×16 f32 each) + 2048 bytes of nibbles per 16 rows × 256 values.
        GgmlDType::Q4K => tiles * (2 * 8 * TILE_N * 4 + QK_K / 8 * TILE_N * 4),
        // scales (16×16 f32) + 4096 bytes per 16 rows × 256 values; packed once a prefill runs.
        GgmlDType::Q6K => tiles * (16 * TILE_N * 4 + QK_K / 4 * TILE_N * 4),
        // 16 f16 scales + 512 bytes per 16 rows × 32 values; only with VNNI.
        GgmlDType::Q8_0 if level == X86Level::Vnni => {
            (n / TILE_N) * (k / 32) * (TILE_N * 2 + 32 * TILE_N)
        }
        _ => 0,
    };
    bytes as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_candles_tiles() {
        // A Llama-3-8B FFN weight (14336 × 4096) in Q4_K: 4/3 of its 144-byte blocks.
        let q4k = extra_bytes(X86Level::Avx2, GgmlDType::Q4K, 14336, 4096);
        let original = 14336 * 4096 / 256 * 144;
        assert_eq!(q4k * 3, original as u64 * 4);
        // SmolLM2's hidden size 576 is not a multiple of 256: nothing is repacked.
        assert_eq!(extra_bytes(X86Level::Vnni, GgmlDType::Q4K, 1536, 576), 0);
        assert_eq!(extra_bytes(X86Level::Avx2, GgmlDType::Q8_0, 4096, 4096), 0);
        assert_eq!(
            extra_bytes(X86Level::Vnni, GgmlDType::Q8_0, 4096, 4096),
            4096 * 4096 / 32 * 34
        );
        assert_eq!(extra_bytes(X86Level::None, GgmlDType::Q4K, 4096, 4096), 0);
    }
}
