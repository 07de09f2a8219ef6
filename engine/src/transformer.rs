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
use candle_nn::ops::rms_norm;
use candle_nn::rotary_emb::{rope, rope_i};

use crate::EngineError;
use crate::attention::{self, AttnSeq, AttnShape};
use crate::decoder::{Decoder, StepInput, StepOutput};
use crate::gguf::{Arch, GgufHeader, HParams};
use crate::kv::{KvDType, KvLayout, KvPool, SlotMap};

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
    layout: KvLayout,
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
            layout: KvLayout::new(
                &src.header.hparams,
                context,
                KvDType::for_device(src.device),
                crate::kv::BLOCK_TOKENS,
            ),
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

    /// Runs one step for every sequence of `input` and returns the logits of those that asked, in order.
    pub fn forward_step(&self, input: &StepInput<'_>, pool: &mut KvPool) -> Result<StepOutput> {
        let hp = &self.hp;
        let n: usize = input.tokens();
        if n == 0 {
            return Ok(StepOutput {
                logits: None,
                rows: Vec::new(),
            });
        }
        pool.ensure()?;
        let mut tokens = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(input.seqs.len());
        for s in &input.seqs {
            if s.start + s.tokens.len() > self.context {
                candle_core::bail!(
                    "positions up to {} exceed the context {}",
                    s.start + s.tokens.len(),
                    self.context
                )
            }
            seqs.push((tokens.len(), s));
            tokens.extend_from_slice(s.tokens);
            positions.extend((s.start..s.start + s.tokens.len()).map(|p| p as u32));
        }
        let layout = pool.layout().clone();
        let portable = pool.host_layer(0).is_none();
        let spans: Vec<(usize, usize, &[Vec<crate::sched::BlockId>])> = input
            .seqs
            .iter()
            .map(|s| (s.start, s.tokens.len(), s.tables))
            .collect();
        let slots = SlotMap::new(&layout, &spans, portable.then_some(&self.device))?;
        let groups: Vec<GroupStep<'_>> = layout
            .groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let shape = AttnShape {
                    n_head: hp.n_head,
                    n_kv: hp.n_head_kv,
                    head_dim: hp.head_dim,
                    scale: hp.attn_scale as f32,
                    window: group.window,
                    ring: group.ring,
                    block_tokens: layout.block_tokens,
                };
                let seqs: Vec<AttnSeq<'_>> = seqs
                    .iter()
                    .map(|(row, s)| AttnSeq {
                        row: *row,
                        start: s.start,
                        len: s.tokens.len(),
                        table: &s.tables[g],
                    })
                    .collect();
                // Global layers write before they attend (see `attention`), rings after.
                let gathers = if portable {
                    attention::gather_indices(&seqs, &shape, group.ring.is_none(), &self.device)?
                } else {
                    Vec::new()
                };
                Ok(GroupStep {
                    shape,
                    seqs,
                    gathers,
                })
            })
            .collect::<Result<_>>()?;
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let gather = |(cos, sin): &(Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
            let half = hp.head_dim / 2;
            Ok((
                cos.index_select(&pos, 0)?.reshape((n, 1, half))?,
                sin.index_select(&pos, 0)?.reshape((n, 1, half))?,
            ))
        };
        let rope_global = gather(&self.rope_global)?;
        let rope_local = self.rope_local.as_ref().map(gather).transpose()?;
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut x = self.embed.embedding(&ids)?.unsqueeze(0)?;
        if hp.arch == Arch::Gemma3 {
            x = (x * (hp.n_embd as f64).sqrt())?;
        }
        let eps = hp.rms_eps as f32;
        for (il, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.attn_norm, eps)?;
            let rope = match (&rope_local, hp.is_local(il)) {
                (Some(local), true) => local,
                _ => &rope_global,
            };
            let ctx = StepContext {
                groups: &groups,
                slots: &slots,
                rope,
                layout: &layout,
            };
            let mut a = self.attention(il, b, &h, &ctx, pool)?;
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
        let mut rows = Vec::new();
        let mut last = Vec::new();
        for (row, s) in &seqs {
            if s.sample {
                rows.push(s.seq);
                last.push((row + s.tokens.len() - 1) as u32);
            }
        }
        if last.is_empty() {
            return Ok(StepOutput { logits: None, rows });
        }
        let idx = Tensor::new(last.as_slice(), &self.device)?;
        let picked = x.squeeze(0)?.index_select(&idx, 0)?.unsqueeze(0)?;
        let picked = rms_norm(&picked, &self.out_norm, eps)?;
        let logits = self
            .lm_head
            .forward(&picked)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        Ok(StepOutput {
            logits: Some(logits),
            rows,
        })
    }

    fn attention(
        &self,
        il: usize,
        b: &Block,
        h: &Tensor,
        ctx: &StepContext<'_>,
        pool: &mut KvPool,
    ) -> Result<Tensor> {
        let hp = &self.hp;
        let (_, n, _) = h.dims3()?;
        let (nh, nkv, hd) = (hp.n_head, hp.n_head_kv, hp.head_dim);
        let mut q = b.wq.forward(h)?.reshape((n, nh, 1, hd))?;
        let mut k = b.wk.forward(h)?.reshape((n, nkv, 1, hd))?;
        let v = b.wv.forward(h)?.reshape((n, nkv, hd))?;
        let eps = hp.rms_eps as f32;
        if let Some(w) = &b.q_norm {
            q = rms_norm(&q.contiguous()?, w, eps)?;
        }
        if let Some(w) = &b.k_norm {
            k = rms_norm(&k.contiguous()?, w, eps)?;
        }
        let (cos, sin) = ctx.rope;
        let (q, k) = match hp.arch {
            Arch::Llama => (
                rope_i(&q.contiguous()?, cos, sin)?,
                rope_i(&k.contiguous()?, cos, sin)?,
            ),
            Arch::Gemma3 => (
                rope(&q.contiguous()?, cos, sin)?,
                rope(&k.contiguous()?, cos, sin)?,
            ),
        };
        let q = q.reshape((n, nh, hd))?;
        let k = k.reshape((n, nkv, hd))?;
        let (g, _) = ctx.layout.place(il);
        let GroupStep {
            shape,
            seqs,
            gathers,
        } = &ctx.groups[g];
        let out = match pool.host_layer(il) {
            Some(layer) => {
                let qh = q.flatten_all()?.to_vec1::<f32>()?;
                let kh = k.flatten_all()?.to_vec1::<f32>()?;
                let vh = v.flatten_all()?.to_vec1::<f32>()?;
                let o = attention::host(&layer, &qh, &kh, &vh, seqs, shape);
                Tensor::from_vec(o, (1, n, nh * hd), &self.device)?
            }
            None => {
                // A global layer keeps every position: its own rows can go into the pool first. A ring
                // may not hold a long chunk's early keys, so it attends first and writes after.
                let in_pool = shape.ring.is_none();
                if in_pool {
                    pool.write(il, &k, &v, ctx.slots)?;
                }
                let (pk, pv) = pool
                    .device_layer(il)
                    .ok_or_else(|| candle_core::Error::Msg("the KV pool is released".into()))?;
                let out = attention::portable(pk, pv, &q, &k, &v, seqs, gathers, shape, in_pool)?
                    .reshape((1, n, nh * hd))?;
                if !in_pool {
                    pool.write(il, &k, &v, ctx.slots)?;
                }
                return b.wo.forward(&out);
            }
        };
        pool.write(il, &k, &v, ctx.slots)?;
        b.wo.forward(&out)
    }
}

/// One layer group's view of a step, the same for all its layers.
struct GroupStep<'a> {
    shape: AttnShape,
    seqs: Vec<AttnSeq<'a>>,
    gathers: Vec<Option<Tensor>>,
}

/// What every layer of one step shares.
struct StepContext<'a> {
    /// Per layer group: the attention shape, each sequence's part, and (portable path) what it gathers.
    groups: &'a [GroupStep<'a>],
    slots: &'a SlotMap,
    /// The rope tables of this layer, gathered at every row's position: `(rows, 1, head_dim / 2)`.
    rope: &'a (Tensor, Tensor),
    layout: &'a KvLayout,
}

impl Decoder for Transformer {
    fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }

    fn context(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        self.hp.vocab_size
    }

    fn forward(
        &self,
        input: &StepInput<'_>,
        pool: &mut KvPool,
    ) -> std::result::Result<StepOutput, EngineError> {
        let vocab = self.hp.vocab_size as u32;
        for s in &input.seqs {
            if let Some(bad) = s.tokens.iter().find(|&&t| t >= vocab) {
                return Err(EngineError::InvalidParameter {
                    field: "prompt",
                    reason: format!("token id {bad} is outside the vocabulary"),
                });
            }
        }
        self.forward_step(input, pool)
            .map_err(|e| EngineError::candle("forward step".into(), e))
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
