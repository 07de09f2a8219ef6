//! A model's predicted memory footprint: weights + KV budget + runtime overhead.

/// What a model will occupy once loaded, predicted from file headers before any weight is read.
///
/// The KV budget is `kv_bytes_per_token × tokens × max_sequences`, where the per-token figure comes from
/// the architecture (`2 · layers · kv_heads · head_dim · dtype_bytes` for plain attention; less where
/// sliding-window layers keep only their window), with `tokens` rounded up to whole KV blocks: the
/// engine's block pool is exactly this size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Bytes of weights as they will sit in memory (quantized blocks stay quantized).
    pub weights_bytes: u64,
    /// Steady runtime overhead beside the weights: rope tables, repacked kernel copies, logits.
    pub overhead_bytes: u64,
    /// Transient working memory of the largest forward pass (a prefill chunk's activations): held only
    /// while a request runs, but charged, because it must fit when one does.
    pub scratch_bytes: u64,
    /// KV-cache bytes for one token of one sequence.
    pub kv_bytes_per_token: u64,
    /// Bytes that every sequence holds whatever its length (sliding-window rings).
    pub kv_fixed_bytes_per_sequence: u64,
    /// Positions per KV block (0 or 1: no rounding); a budget is rounded up to whole blocks.
    pub kv_block_tokens: u32,
    /// The configured context window, in tokens: the most a sequence may hold.
    pub context_tokens: u32,
    /// Sequences served at once (each gets a full KV budget).
    pub max_sequences: u32,
}

impl Footprint {
    /// KV bytes for `tokens` of context across all sequences.
    pub fn kv_bytes(&self, tokens: u32) -> u64 {
        let block = u64::from(self.kv_block_tokens.max(1));
        let tokens = u64::from(tokens).div_ceil(block).saturating_mul(block);
        let per_sequence = self
            .kv_bytes_per_token
            .saturating_mul(tokens)
            .saturating_add(self.kv_fixed_bytes_per_sequence);
        per_sequence.saturating_mul(u64::from(self.max_sequences.max(1)))
    }

    /// Weights and steady overhead: what stays allocated between requests, KV aside.
    pub fn steady_bytes(&self) -> u64 {
        self.weights_bytes.saturating_add(self.overhead_bytes)
    }

    /// Steady bytes plus scratch: the part that does not depend on the KV budget.
    pub fn static_bytes(&self) -> u64 {
        self.steady_bytes().saturating_add(self.scratch_bytes)
    }

    /// The whole footprint with a KV budget of `tokens`.
    pub fn total_with_kv(&self, tokens: u32) -> u64 {
        self.static_bytes().saturating_add(self.kv_bytes(tokens))
    }

    /// The whole footprint at the full configured context.
    pub fn total(&self) -> u64 {
        self.total_with_kv(self.context_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_shape() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64, f32 cache: 2·30·3·64·4 = 46,080 bytes per token.
        let f = Footprint {
            weights_bytes: 98_000_000,
            overhead_bytes: 1_000_000,
            scratch_bytes: 0,
            kv_bytes_per_token: 2 * 30 * 3 * 64 * 4,
            kv_fixed_bytes_per_sequence: 0,
            kv_block_tokens: 16,
            context_tokens: 2048,
            max_sequences: 1,
        };
        assert_eq!(f.kv_bytes(2048), 94_371_840);
        assert_eq!(f.total(), 99_000_000 + 94_371_840);
        assert_eq!(f.total_with_kv(512), 99_000_000 + 23_592_960);
        // Rounded up to whole blocks of 16.
        assert_eq!(f.kv_bytes(17), f.kv_bytes(32));
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        let f = Footprint {
            weights_bytes: u64::MAX,
            overhead_bytes: u64::MAX,
            scratch_bytes: u64::MAX,
            kv_bytes_per_token: u64::MAX,
            kv_fixed_bytes_per_sequence: u64::MAX,
            kv_block_tokens: u32::MAX,
            context_tokens: u32::MAX,
            max_sequences: u32::MAX,
        };
        assert_eq!(f.total(), u64::MAX);
    }
}
