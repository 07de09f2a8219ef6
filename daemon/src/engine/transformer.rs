//! ult's own decoder forward pass for quantized GGUF models: Llama (SmolLM2) and Gemma 3.
//!
//! Owning it lets ult size everything to the configured context (rope tables, KV caches with rings for
//! sliding-window layers), compute logits for the last position only, embed straight from the quantized
//! table, and fix what candle-transformers' `quantized_gemma3` gets wrong (SiLU for GELU-tanh, no
//! sliding-window mask on decode, a dtype clash on multi-token forwards at a non-zero position, and
//! 131072-position rope tables per layer).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::ops::{rms_norm, softmax_last_dim};
use candle_nn::rotary_emb::{rope, rope_i};

use super::EngineError;
use super::gguf::{Arch, GgufHeader, HParams};
use super::kv::{KvCache, attention_mask};

/// Reads tensors out of a mapped GGUF file onto a device, counting bytes for progress reports.
pub struct WeightSource<'a> {
    /// The validated header.
    pub header: &'a GgufHeader,
    /// The whole file's bytes.
    pub data: &'a [u8],
    /// Where tensors go.
    pub device: &'a Device,
    /// Called with the bytes of each tensor read.
    pub progress: &'a (dyn Fn(u64) + Sync),
    /// Dequantize every matrix to f32 (a numerical reference for correctness checks, not for serving).
    pub dequantize: bool,
}

impl WeightSource<'_> {
    fn qtensor(&self, name: &str) -> std::result::Result<QTensor, EngineError> {
        let meta = self.header.tensor(name)?;
        let bytes = self.bytes_of(name, meta)?;
        let q = qtensor_from_ggml(meta.dtype, bytes, meta.dims.clone(), self.device)
            .map_err(|e| EngineError::candle(format!("reading tensor {name}"), e))?;
        (self.progress)(meta.bytes);
        Ok(q)
    }

    /// The file bytes of tensor `name`.
    fn bytes_of(
        &self,
        name: &str,
        meta: &super::gguf::TensorMeta,
    ) -> std::result::Result<&[u8], EngineError> {
        let start = usize::try_from(meta.offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(meta.bytes).unwrap_or(usize::MAX));
        // The header check guarantees the range; re-check because Candle reads the slice unchecked.
        let bytes = self
            .data
            .get(start..end)
            .ok_or_else(|| EngineError::CorruptModel {
                path: self.header.path.display().to_string(),
                reason: format!("tensor {name} lies outside the mapped file"),
            })?;
        Ok(bytes)
    }

    fn qmatmul(&self, name: &str) -> std::result::Result<QMatMul, EngineError> {
        let q = self.qtensor(name)?;
        self.matmul_of(Arc::new(q), name)
    }

    fn matmul_of(&self, q: Arc<QTensor>, name: &str) -> std::result::Result<QMatMul, EngineError> {
        let wrap = |e| EngineError::candle(format!("preparing {name}"), e);
        if self.dequantize {
            Ok(QMatMul::Tensor(q.dequantize(self.device).map_err(wrap)?))
        } else {
            QMatMul::from_arc(q).map_err(wrap)
        }
    }

    fn vector(&self, name: &str) -> std::result::Result<Tensor, EngineError> {
        self.qtensor(name)?
            .dequantize(self.device)
            .map_err(|e| EngineError::candle(format!("dequantizing {name}"), e))
    }

    fn optional_vector(&self, name: &str) -> std::result::Result<Option<Tensor>, EngineError> {
        if self.header.tensors.contains_key(name) {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    post_ffn_norm: Option<Tensor>,
}

/// A loaded decoder.
pub struct Transformer {
    hp: HParams,
    embed: Arc<QTensor>,
    blocks: Vec<Block>,
    out_norm: Tensor,
    lm_head: QMatMul,
    rope_global: (Tensor, Tensor),
    rope_local: Option<(Tensor, Tensor)>,
    device: Device,
    context: usize,
}

impl Transformer {
    /// Loads every weight of `src` for a context of `context` positions.
    pub fn load(src: &WeightSource<'_>, context: usize) -> std::result::Result<Self, EngineError> {
        let hp = src.header.hparams.clone();
        let gemma = hp.arch == Arch::Gemma3;
        let embed = Arc::new(src.qtensor("token_embd.weight")?);
        let mut blocks = Vec::with_capacity(hp.n_layer);
        for il in 0..hp.n_layer {
            let p = |t: &str| format!("blk.{il}.{t}.weight");
            blocks.push(Block {
                attn_norm: src.vector(&p("attn_norm"))?,
                wq: src.qmatmul(&p("attn_q"))?,
                wk: src.qmatmul(&p("attn_k"))?,
                wv: src.qmatmul(&p("attn_v"))?,
                wo: src.qmatmul(&p("attn_output"))?,
                q_norm: src.optional_vector(&p("attn_q_norm"))?,
                k_norm: src.optional_vector(&p("attn_k_norm"))?,
                post_attn_norm: src.optional_vector(&p("post_attention_norm"))?,
                ffn_norm: src.vector(&p("ffn_norm"))?,
                gate: src.qmatmul(&p("ffn_gate"))?,
                up: src.qmatmul(&p("ffn_up"))?,
                down: src.qmatmul(&p("ffn_down"))?,
                post_ffn_norm: src.optional_vector(&p("post_ffw_norm"))?,
            });
        }
        let out_norm = src.vector("output_norm.weight")?;
        // Tied embeddings share the quantized table with the output head: no second copy.
        let lm_head = if src.header.tensors.contains_key("output.weight") {
            src.qmatmul("output.weight")?
        } else {
            src.matmul_of(embed.clone(), "the tied output head")?
        };
        let tables = |base: f32, scale: f32| {
            rope_tables(hp.head_dim, context, base, scale, src.device)
                .map_err(|e| EngineError::candle("building rope tables".into(), e))
        };
        let rope_global = tables(hp.rope_base, hp.rope_scale)?;
        let rope_local = if gemma {
            Some(tables(hp.rope_local_base, 1.0)?)
        } else {
            None
        };
        Ok(Self {
            hp,
            embed,
            blocks,
            out_norm,
            lm_head,
            rope_global,
            rope_local,
            device: src.device.clone(),
            context,
        })
    }

    /// The hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// The context this model was loaded for.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A new KV cache for up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let hp = &self.hp;
        KvCache::new(
            hp.n_layer,
            hp.n_head_kv,
            hp.head_dim,
            capacity.min(self.context),
            |il| {
                if hp.is_local(il) {
                    hp.sliding_window
                } else {
                    None
                }
            },
            &self.device,
        )
    }

    /// Runs `tokens` at the cache's next positions and returns the logits of the last one, `(vocab,)`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let seq = tokens.len();
        let pos = cache.len();
        if seq == 0 {
            candle_core::bail!("forward of zero tokens")
        }
        if pos + seq > cache.capacity() {
            candle_core::bail!(
                "{} positions exceed the cache capacity {}",
                pos + seq,
                cache.capacity()
            )
        }
        let hp = &self.hp;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.embedding(&ids)?.unsqueeze(0)?;
        if hp.arch == Arch::Gemma3 {
            x = (x * (hp.n_embd as f64).sqrt())?;
        }
        let eps = hp.rms_eps as f32;
        for (il, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.attn_norm, eps)?;
            let mut a = self.attention(il, b, &h, pos, cache)?;
            if let Some(n) = &b.post_attn_norm {
                a = rms_norm(&a, n, eps)?;
            }
            x = (x + a)?;
            let h = rms_norm(&x, &b.ffn_norm, eps)?;
            let gate = b.gate.forward(&h)?;
            let act = match hp.arch {
                Arch::Gemma3 => gate.gelu()?,
                Arch::Llama => gate.silu()?,
            };
            let mut m = b.down.forward(&(act * b.up.forward(&h)?)?)?;
            if let Some(n) = &b.post_ffn_norm {
                m = rms_norm(&m, n, eps)?;
            }
            x = (x + m)?;
        }
        cache.advance(seq);
        let last = x.narrow(1, seq - 1, 1)?.contiguous()?;
        let last = rms_norm(&last, &self.out_norm, eps)?;
        self.lm_head
            .forward(&last)?
            .flatten_all()?
            .to_dtype(DType::F32)
    }

    fn attention(
        &self,
        il: usize,
        b: &Block,
        h: &Tensor,
        pos: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let hp = &self.hp;
        let (_, seq, _) = h.dims3()?;
        let (nh, nkv, hd) = (hp.n_head, hp.n_head_kv, hp.head_dim);
        let mut q = b.wq.forward(h)?.reshape((1, seq, nh, hd))?;
        let mut k = b.wk.forward(h)?.reshape((1, seq, nkv, hd))?;
        let v = b.wv.forward(h)?.reshape((1, seq, nkv, hd))?;
        let eps = hp.rms_eps as f32;
        if let Some(n) = &b.q_norm {
            q = rms_norm(&q.contiguous()?, n, eps)?;
        }
        if let Some(n) = &b.k_norm {
            k = rms_norm(&k.contiguous()?, n, eps)?;
        }
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let local = hp.is_local(il);
        let (cos, sin) = match (&self.rope_local, local) {
            (Some(tables), true) => tables,
            _ => &self.rope_global,
        };
        let cos = cos.narrow(0, pos, seq)?;
        let sin = sin.narrow(0, pos, seq)?;
        let (q, k) = match hp.arch {
            Arch::Llama => (rope_i(&q, &cos, &sin)?, rope_i(&k, &cos, &sin)?),
            Arch::Gemma3 => (rope(&q, &cos, &sin)?, rope(&k, &cos, &sin)?),
        };
        let att = cache.append(il, &k, &v)?;
        let n_keys = att.k.dim(2)?;
        let window = if local { hp.sliding_window } else { None };
        let mask = if seq > 1 {
            Some(attention_mask(
                pos,
                seq,
                att.positions.as_deref(),
                n_keys,
                window,
                &self.device,
            )?)
        } else {
            None
        };
        // Grouped-query attention without copying keys: the query heads of one KV head are stacked on
        // the sequence axis.
        let n_rep = nh / nkv;
        let qg = q.reshape((1, nkv, n_rep * seq, hd))?;
        let mut scores = (qg.matmul(&att.k.t()?)? * hp.attn_scale)?;
        if let Some(mask) = mask {
            scores = scores
                .reshape((1, nkv, n_rep, seq, n_keys))?
                .broadcast_add(&mask)?
                .reshape((1, nkv, n_rep * seq, n_keys))?;
        }
        let probs = softmax_last_dim(&scores)?;
        let out = probs.matmul(&att.v)?;
        let out = out
            .reshape((1, nh, seq, hd))?
            .transpose(1, 2)?
            .reshape((1, seq, nh * hd))?;
        b.wo.forward(&out)
    }
}

/// `cos` and `sin` tables `(context, head_dim/2)` for rope with `base`, positions divided by `scale`.
fn rope_tables(
    head_dim: usize,
    context: usize,
    base: f32,
    scale: f32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1f32 / base.powf(2.0 * i as f32 / head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions: Vec<f32> = (0..context).map(|p| p as f32 / scale).collect();
    let positions = Tensor::from_vec(positions, (context, 1), device)?;
    let freqs = positions.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
}

/// The index of the largest logit.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
