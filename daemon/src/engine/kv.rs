//! Per-sequence KV caches, pre-allocated at their budget: a linear cache for global-attention layers and
//! a ring of `window` slots for sliding-window layers, so Gemma 3's local layers hold 512 positions
//! whatever the context.

use candle_core::{DType, Device, Result, Tensor};

/// The cache of one layer.
#[derive(Debug)]
enum LayerCache {
    /// Positions `0..len` of a `(1, kv_heads, capacity, head_dim)` buffer.
    Linear { k: Tensor, v: Tensor },
    /// Slot `p % window` holds position `p`.
    Ring { k: Tensor, v: Tensor, window: usize },
}

/// One sequence's KV cache across all layers, and how many positions it holds.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
}

/// Keys and values to attend over for one layer, with the absolute position of every key (needed for
/// masks when a ring has wrapped).
pub struct Attended {
    /// `(1, kv_heads, n, head_dim)`.
    pub k: Tensor,
    /// `(1, kv_heads, n, head_dim)`.
    pub v: Tensor,
    /// Absolute positions of the `n` keys, or `None` when they are `0..n` in order.
    pub positions: Option<Vec<usize>>,
}

impl KvCache {
    /// Allocates a cache for `capacity` positions. `window(il)` gives the sliding window of layer `il`
    /// (None for global layers).
    pub fn new(
        n_layer: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        window: impl Fn(usize) -> Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..n_layer)
            .map(|il| {
                let (slots, ring) = match window(il) {
                    Some(w) if w < capacity => (w, Some(w)),
                    _ => (capacity, None),
                };
                let shape = (1, kv_heads, slots, head_dim);
                let k = Tensor::zeros(shape, DType::F32, device)?;
                let v = Tensor::zeros(shape, DType::F32, device)?;
                Ok(match ring {
                    Some(window) => LayerCache::Ring { k, v, window },
                    None => LayerCache::Linear { k, v },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (the buffers stay allocated for the next sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Marks `n` more positions as written (after every layer has appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::Linear { k, v } | LayerCache::Ring { k, v, .. } => {
                    (k.elem_count() + v.elem_count()) * 4
                }
            })
            .sum()
    }

    /// Appends `k`, `v` of shape `(1, kv_heads, n, head_dim)` for positions `len..len+n` of layer `il`
    /// and returns what those `n` queries attend over.
    pub fn append(&mut self, il: usize, k: &Tensor, v: &Tensor) -> Result<Attended> {
        let pos = self.len;
        let n = k.dim(2)?;
        match &mut self.layers[il] {
            LayerCache::Linear { k: kc, v: vc } => {
                if pos + n > kc.dim(2)? {
                    candle_core::bail!("kv cache overflow: {} + {n} > {}", pos, kc.dim(2)?)
                }
                kc.slice_set(k, 2, pos)?;
                vc.slice_set(v, 2, pos)?;
                Ok(Attended {
                    k: kc.narrow(2, 0, pos + n)?,
                    v: vc.narrow(2, 0, pos + n)?,
                    positions: None,
                })
            }
            LayerCache::Ring {
                k: kc,
                v: vc,
                window,
            } => {
                let window = *window;
                if n == 1 {
                    // Decode: slot `pos % window` takes the new position; the slots then hold exactly the
                    // last `window` positions (or all of them before wrapping), and attention over a set
                    // needs no order or mask.
                    let slot = pos % window;
                    kc.slice_set(k, 2, slot)?;
                    vc.slice_set(v, 2, slot)?;
                    let held = (pos + 1).min(window);
                    return Ok(Attended {
                        k: kc.narrow(2, 0, held)?,
                        v: vc.narrow(2, 0, held)?,
                        positions: None,
                    });
                }
                // Prefill: attend over the ring's old contents plus the new keys, then store the newest.
                let filled = pos.min(window);
                let positions: Vec<usize> = (0..filled)
                    .map(|s| ring_position(s, pos, window))
                    .chain(pos..pos + n)
                    .collect();
                let (all_k, all_v) = if filled == 0 {
                    (k.clone(), v.clone())
                } else {
                    (
                        Tensor::cat(&[&kc.narrow(2, 0, filled)?, k], 2)?,
                        Tensor::cat(&[&vc.narrow(2, 0, filled)?, v], 2)?,
                    )
                };
                // The newest `keep` positions go to their slots in at most two contiguous runs.
                let keep = n.min(window);
                let first = n - keep;
                let slot = (pos + first) % window;
                let run = keep.min(window - slot);
                kc.slice_set(&k.narrow(2, first, run)?.contiguous()?, 2, slot)?;
                vc.slice_set(&v.narrow(2, first, run)?.contiguous()?, 2, slot)?;
                if run < keep {
                    kc.slice_set(&k.narrow(2, first + run, keep - run)?.contiguous()?, 2, 0)?;
                    vc.slice_set(&v.narrow(2, first + run, keep - run)?.contiguous()?, 2, 0)?;
                }
                Ok(Attended {
                    k: all_k,
                    v: all_v,
                    positions: Some(positions),
                })
            }
        }
    }
}

/// The absolute position held by ring slot `slot` when positions `0..len` have been written.
fn ring_position(slot: usize, len: usize, window: usize) -> usize {
    if len <= window {
        slot
    } else {
        let last = len - 1;
        last - ((last + window - slot) % window)
    }
}

/// An additive attention mask `(n_queries, n_keys)`: 0 where query `i` (at absolute position
/// `first_query + i`) may see key `j`, −∞ elsewhere. Keys are at `key_positions` (or `0..n_keys`).
/// With a window, a query sees only keys less than `window` positions behind it.
pub fn attention_mask(
    first_query: usize,
    n_queries: usize,
    key_positions: Option<&[usize]>,
    n_keys: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(n_queries * n_keys);
    for i in 0..n_queries {
        let q = first_query + i;
        for j in 0..n_keys {
            let k = key_positions.map_or(j, |p| p[j]);
            let visible = k <= q && window.is_none_or(|w| q - k < w);
            data.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(data, (n_queries, n_keys), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_positions() {
        // Window 4, 6 positions written: slots hold 4, 5, 2, 3.
        let got: Vec<usize> = (0..4).map(|s| ring_position(s, 6, 4)).collect();
        assert_eq!(got, vec![4, 5, 2, 3]);
        assert_eq!(
            (0..3).map(|s| ring_position(s, 3, 4)).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn mask_respects_causality_and_window() {
        let m = attention_mask(2, 2, None, 4, Some(2), &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(v, vec![vec![inf, 0.0, 0.0, inf], vec![inf, inf, 0.0, 0.0]]);
    }

    #[test]
    fn ring_matches_linear_attention_inputs() {
        // A ring of 4 holding 6 positions returns the last 4 positions' keys for a decode step.
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, 1, 1, 16, |_| Some(4), &dev).unwrap();
        for p in 0..6 {
            let k = Tensor::new(&[[[[p as f32]]]], &dev).unwrap();
            cache.append(0, &k, &k).unwrap();
            cache.advance(1);
        }
        let k = Tensor::new(&[[[[6f32]]]], &dev).unwrap();
        let a = cache.append(0, &k, &k).unwrap();
        let mut got: Vec<f32> = a.k.flatten_all().unwrap().to_vec1().unwrap();
        got.sort_by(f32::total_cmp);
        assert_eq!(got, vec![3.0, 4.0, 5.0, 6.0]);
    }
}
