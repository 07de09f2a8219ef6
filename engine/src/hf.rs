//! Hugging Face and MLX model folders (`config.json`, `model*.safetensors`, `tokenizer.json`) served by the
//! same decoder as GGUF files: the config becomes the GGUF metadata llama.cpp's converter would write, the
//! tensors take their GGUF names, and each is converted as it is loaded.
//!
//! - Plain F32/F16/BF16 tensors are used as stored (16-bit matrices widen to f32 on load, as a GGUF F16
//!   file's do).
//! - MLX's affine 4-bit groups (`w = scale·q + bias` over 32, 64 or 128 values, 8 per packed `uint32`)
//!   become Candle's Q4_1 blocks (`d·q + m` over 32): every group splits into blocks that share its scale
//!   and bias, so the only change is rounding the scale and bias to f16 (exact for bf16 values of normal
//!   range).
//! - MLX's 8-bit groups have no affine 8-bit counterpart in ggml, so each block of 32 is dequantized
//!   (`scale·q + bias` in f32) and quantized again to Q8_0 (`d·q`, `d = max|w|/127`): an error of at most
//!   half of Q8_0's step per weight on top of MLX's own, about the noise of quantizing the f32 weights to
//!   Q8_0 directly.
//! - MoE routers (`mlp.gate`, which mlx-lm keeps at 8 bits) are dequantized to f32, exactly: routing is
//!   where small errors flip discrete choices, and llama.cpp's converter keeps routers in f32 too.
//! - Llama-family query and key rows are permuted as llama.cpp's converter permutes them (the file's
//!   rotate-half rope becomes GGUF's interleaved pairs), and Llama 3's `rope_scaling` becomes the
//!   `rope_freqs` factors the converter computes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value as Md;
use rayon::prelude::*;
use serde_json::Value;

use crate::EngineError;
use crate::bert::{SafeTensor, SafetensorsHeader};
use crate::gguf::{Arch, GgufHeader, TensorMeta};
use crate::tokenizer::hf_json;

/// Whether `path` is a model folder (a directory with a `config.json`).
pub fn is_model_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// A tensor's bytes in one safetensors file.
#[derive(Debug, Clone)]
struct Stored {
    file: usize,
    tensor: SafeTensor,
}

/// One GGUF tensor's pieces in the folder ("weight", "bias", "scales", "biases"), each with its own name.
type Parts = HashMap<&'static str, (String, Stored)>;

/// How one GGUF-named tensor is made from the folder's tensors.
#[derive(Debug, Clone)]
enum Recipe {
    /// A float tensor as stored; rows reordered by `permute` (heads) when set.
    Plain { src: Stored, permute: Option<usize> },
    /// MLX affine groups of `bits` over `group` values, as Q4_1 (4 bits) or Q8_0 (8 bits) rows, or as
    /// f32 values (`dequantize`).
    Mlx {
        weight: Stored,
        scales: Stored,
        biases: Stored,
        bits: usize,
        group: usize,
        cols: usize,
        permute: Option<usize>,
        dequantize: bool,
    },
    /// Per-expert tensors stacked in expert order.
    Stack(Vec<Recipe>),
    /// Computed at read time (Llama 3's rope factors).
    Computed(Vec<f32>),
}

/// A model folder, read and validated without reading any weight.
#[derive(Debug, Clone)]
pub struct HfModel {
    /// What the folder holds in GGUF's terms: hyper-parameters, tokenizer, chat template, and each tensor
    /// as it will be in memory (its type after conversion, dimensions and bytes), which the footprint
    /// reads.
    pub header: GgufHeader,
    files: Vec<PathBuf>,
    recipes: BTreeMap<String, Recipe>,
}

/// The folder's files mapped for a load.
pub struct HfWeights<'a> {
    maps: Vec<memmap2::Mmap>,
    model: &'a HfModel,
}

/// Bytes of one tensor in ggml's layout: a slice of a mapped file, or a converted copy kept 8-byte
/// aligned (Candle reads blocks through a typed pointer).
pub enum TensorBytes<'a> {
    /// Straight from the file.
    Mapped(&'a [u8]),
    /// Converted.
    Owned {
        /// Storage (8-byte aligned).
        words: Vec<u64>,
        /// Bytes in use.
        len: usize,
    },
}

impl std::ops::Deref for TensorBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(b) => b,
            Self::Owned { words, len } => &bytemuck::cast_slice::<u64, u8>(words)[..*len],
        }
    }
}

/// A zeroed, 8-byte aligned buffer of `len` bytes, filled by `fill` through its bytes.
fn owned(len: usize, fill: impl FnOnce(&mut [u8])) -> TensorBytes<'static> {
    let mut words = vec![0u64; len.div_ceil(8)];
    fill(&mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len]);
    TensorBytes::Owned { words, len }
}

impl HfModel {
    /// Reads `dir`'s config, tokenizer and safetensors headers and plans every tensor's conversion.
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let shown = dir.display().to_string();
        let corrupt = |reason: String| EngineError::CorruptModel {
            path: shown.clone(),
            reason,
        };
        let unsupported = |what: String| EngineError::UnsupportedFeature {
            path: shown.clone(),
            what,
        };
        let config_path = dir.join("config.json");
        let config: Value = std::fs::read_to_string(&config_path)
            .map_err(|e| EngineError::Io {
                path: config_path.display().to_string(),
                source: e,
            })
            .and_then(|t| {
                serde_json::from_str(&t).map_err(|e| corrupt(format!("config.json: {e}")))
            })?;
        // Multimodal configs keep the language model's fields under text_config.
        let cfg = if config["text_config"].is_object() {
            &config["text_config"]
        } else {
            &config
        };
        let model_type = cfg["model_type"].as_str().unwrap_or_default();
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "qwen3_moe" => Arch::Qwen3Moe,
            other => {
                return Err(EngineError::UnsupportedArchitecture {
                    path: shown.clone(),
                    arch: format!(
                        "{other} (model folders: llama, mistral, qwen2, qwen3, qwen3_moe)"
                    ),
                });
            }
        };
        let (files, stored) = read_safetensors(dir)?;
        let num = |k: &str| cfg[k].as_u64().map(|v| v as usize);
        let req = |k: &str| num(k).ok_or_else(|| corrupt(format!("config.json has no {k}")));
        let n_embd = req("hidden_size")?;
        let n_head = req("num_attention_heads")?;
        let n_head_kv = num("num_key_value_heads").unwrap_or(n_head);
        let head_dim = num("head_dim").unwrap_or(n_embd / n_head.max(1));
        let quant = config
            .get("quantization")
            .or_else(|| config.get("quantization_config"))
            .filter(|q| q.is_object());
        if let Some(q) = quant
            && let Some(mode) = q["mode"].as_str()
            && mode != "affine"
        {
            return Err(unsupported(format!(
                "MLX {mode} quantization (ult reads affine)"
            )));
        }
        let permute = |gguf: &str| match (arch, gguf.rsplit('.').nth(1)) {
            (Arch::Llama, Some("attn_q")) => Some(n_head),
            (Arch::Llama, Some("attn_k")) => Some(n_head_kv),
            _ => None,
        };
        // Group the folder's tensors by their GGUF name (and expert), as weight/bias/scales/biases parts.
        let mut parts: BTreeMap<(String, Option<usize>), Parts> = BTreeMap::new();
        for (name, s) in &stored {
            let Some((gguf, expert, part)) = gguf_name(name) else {
                tracing::debug!(tensor = %name, dir = %shown, "tensor not used by the decoder");
                continue;
            };
            parts
                .entry((gguf, expert))
                .or_default()
                .insert(part, (name.clone(), s.clone()));
        }
        let mut recipes: BTreeMap<String, Recipe> = BTreeMap::new();
        let mut experts: BTreeMap<String, BTreeMap<usize, Recipe>> = BTreeMap::new();
        for ((gguf, expert), p) in parts {
            let recipe = if let Some((name, weight)) =
                p.get("weight").filter(|_| p.contains_key("scales"))
            {
                let module = name.trim_end_matches(".weight");
                let (bits, group) = quant_params(quant, module).ok_or_else(|| {
                    corrupt(format!(
                        "{name} is packed but config.json has no quantization for it"
                    ))
                })?;
                let (Some((_, scales)), Some((_, biases))) = (p.get("scales"), p.get("biases"))
                else {
                    return Err(corrupt(format!("{module} has scales but no biases")));
                };
                let dequantize = gguf.ends_with(".ffn_gate_inp.weight");
                mlx_recipe(
                    weight,
                    scales,
                    biases,
                    bits,
                    group,
                    permute(&gguf),
                    dequantize,
                )
                .map_err(|e| match e {
                    Bad::Corrupt(r) => corrupt(format!("{module}: {r}")),
                    Bad::Unsupported(w) => unsupported(format!("{module}: {w}")),
                })?
            } else if let Some((name, s)) = p.get("weight").or_else(|| p.get("bias")) {
                if !matches!(s.tensor.dtype, DType::F32 | DType::F16 | DType::BF16) {
                    return Err(unsupported(format!(
                        "{name} of type {:?} (ult reads F32, F16, BF16 and MLX's packed groups)",
                        s.tensor.dtype
                    )));
                }
                Recipe::Plain {
                    src: s.clone(),
                    permute: permute(&gguf),
                }
            } else {
                continue;
            };
            match expert {
                None => {
                    recipes.insert(gguf, recipe);
                }
                Some(e) => {
                    experts.entry(gguf).or_default().insert(e, recipe);
                }
            }
        }
        for (gguf, by_expert) in experts {
            let n = by_expert.len();
            if by_expert.keys().copied().ne(0..n) {
                return Err(corrupt(format!(
                    "{gguf}: the experts are not numbered 0..{n}"
                )));
            }
            recipes.insert(gguf, Recipe::Stack(by_expert.into_values().collect()));
        }
        let rope_theta = cfg["rope_theta"].as_f64().unwrap_or(10_000.0);
        let mut md: HashMap<String, Md> = HashMap::new();
        let a = arch.as_str();
        let mut put = |k: &str, v: Md| {
            md.insert(format!("{a}.{k}"), v);
        };
        let u = |v: usize| Md::U64(v as u64);
        put("block_count", u(req("num_hidden_layers")?));
        put("embedding_length", u(n_embd));
        put("attention.head_count", u(n_head));
        put("attention.head_count_kv", u(n_head_kv));
        put("attention.key_length", u(head_dim));
        put("attention.value_length", u(head_dim));
        put(
            "feed_forward_length",
            u(num("intermediate_size").unwrap_or(0)),
        );
        put(
            "context_length",
            u(num("max_position_embeddings").unwrap_or(2048)),
        );
        put(
            "attention.layer_norm_rms_epsilon",
            Md::F64(cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6)),
        );
        put("rope.freq_base", Md::F64(rope_theta));
        if arch == Arch::Qwen3Moe {
            put("expert_count", u(req("num_experts")?));
            put("expert_used_count", u(req("num_experts_per_tok")?));
            put(
                "expert_feed_forward_length",
                u(req("moe_intermediate_size")?),
            );
            if cfg["norm_topk_prob"].as_bool() == Some(false) {
                return Err(unsupported(
                    "Qwen3-MoE without norm_topk_prob (ult renormalises the chosen gates)".into(),
                ));
            }
            let dense = cfg["mlp_only_layers"]
                .as_array()
                .is_some_and(|l| !l.is_empty());
            if dense || num("decoder_sparse_step").is_some_and(|s| s != 1) {
                return Err(unsupported(
                    "Qwen3-MoE with dense layers (mlp_only_layers, decoder_sparse_step)".into(),
                ));
            }
        }
        let scaling = &cfg["rope_scaling"];
        if scaling.is_object() {
            let kind = scaling["rope_type"]
                .as_str()
                .or_else(|| scaling["type"].as_str())
                .unwrap_or("default");
            let factor = scaling["factor"].as_f64().unwrap_or(1.0);
            match kind {
                "default" => {}
                "linear" => {
                    put("rope.scaling.type", Md::String("linear".into()));
                    put("rope.scaling.factor", Md::F64(factor));
                }
                "yarn" => {
                    put("rope.scaling.type", Md::String("yarn".into()));
                    put("rope.scaling.factor", Md::F64(factor));
                    if let Some(o) = scaling["original_max_position_embeddings"].as_u64() {
                        put("rope.scaling.original_context_length", Md::U64(o));
                    }
                    for (k, key) in [
                        ("beta_fast", "rope.scaling.yarn_beta_fast"),
                        ("beta_slow", "rope.scaling.yarn_beta_slow"),
                        ("attention_factor", "rope.scaling.attn_factor"),
                    ] {
                        if let Some(v) = scaling[k].as_f64() {
                            put(key, Md::F64(v));
                        }
                    }
                }
                "llama3" if arch == Arch::Llama => {
                    recipes.insert(
                        "rope_freqs.weight".into(),
                        Recipe::Computed(llama3_rope_factors(scaling, rope_theta, head_dim)),
                    );
                }
                other => {
                    return Err(unsupported(format!(
                        "rope scaling {other:?} in a model folder (ult reads linear, yarn and llama3)"
                    )));
                }
            }
        }
        let vocab = hf_json::vocab_from_dir(dir)?;
        let chat_template = hf_json::chat_template_from_dir(dir)?;
        let tensors = recipes
            .iter()
            .map(|(name, r)| (name.clone(), meta_of(r)))
            .collect::<BTreeMap<_, _>>();
        let hparams = crate::gguf::hparams_from_metadata(arch, &md, &vocab, &tensors, dir)?;
        let file_len = stored
            .values()
            .map(|s| (s.tensor.end - s.tensor.start) as u64)
            .sum();
        Ok(Self {
            header: GgufHeader {
                path: dir.to_path_buf(),
                file_len,
                hparams,
                vocab,
                chat_template,
                tensors,
                name: dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            },
            files,
            recipes,
        })
    }

    /// Maps the folder's files for a load.
    pub fn open(&self) -> Result<HfWeights<'_>, EngineError> {
        let maps = self
            .files
            .iter()
            .map(|p| crate::map_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HfWeights { maps, model: self })
    }
}

impl HfWeights<'_> {
    /// The bytes of tensor `name` (a GGUF name) in ggml's layout, converted as its recipe says.
    pub fn bytes(&self, name: &str) -> Result<TensorBytes<'_>, EngineError> {
        let recipe = self
            .model
            .recipes
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.model.header.path.display().to_string(),
                name: name.to_string(),
            })?;
        self.make(name, recipe)
    }

    fn stored(&self, name: &str, s: &Stored) -> Result<&[u8], EngineError> {
        self.maps
            .get(s.file)
            .and_then(|m| m.get(s.tensor.start..s.tensor.end))
            .ok_or_else(|| EngineError::CorruptModel {
                path: self.model.header.path.display().to_string(),
                reason: format!("tensor {name} lies outside its mapped file"),
            })
    }

    fn make(&self, name: &str, recipe: &Recipe) -> Result<TensorBytes<'_>, EngineError> {
        match recipe {
            Recipe::Plain { src, permute } => {
                let bytes = self.stored(name, src)?;
                // Candle reads float elements through a typed pointer: 4-byte alignment covers F32, F16 and BF16.
                let aligned = (bytes.as_ptr() as usize).is_multiple_of(4);
                if permute.is_none() && aligned {
                    return Ok(TensorBytes::Mapped(bytes));
                }
                let rows = src.tensor.shape.first().copied().unwrap_or(1).max(1);
                let row = (bytes.len() / rows).max(1);
                Ok(owned(bytes.len(), |out| {
                    for (i, dst) in out.chunks_mut(row).enumerate() {
                        let j = permute.map_or(i, |heads| permuted_row(i, rows, heads));
                        dst.copy_from_slice(&bytes[j * row..(j + 1) * row]);
                    }
                }))
            }
            Recipe::Mlx {
                weight,
                scales,
                biases,
                bits,
                group,
                cols,
                permute,
                dequantize,
            } => {
                let w = self.stored(name, weight)?;
                let s = self.stored(name, scales)?;
                let b = self.stored(name, biases)?;
                let rows: usize = weight.tensor.shape[..weight.tensor.shape.len() - 1]
                    .iter()
                    .product();
                // Permutation applies within each expert's rows; MLX stacks are never permuted.
                let per = weight.tensor.shape[weight.tensor.shape.len() - 2];
                let q = MlxRows {
                    w,
                    s,
                    b,
                    sdtype: scales.tensor.dtype,
                    bits: *bits,
                    group: *group,
                    cols: *cols,
                };
                let row_bytes = if *dequantize {
                    q.cols * 4
                } else {
                    q.out_row_bytes()
                };
                Ok(owned(rows * row_bytes, |out| {
                    out.par_chunks_mut(row_bytes)
                        .enumerate()
                        .for_each(|(i, dst)| {
                            let base = i - i % per;
                            let j = base
                                + permute
                                    .map_or(i % per, |heads| permuted_row(i % per, per, heads));
                            if *dequantize {
                                q.dequantize_row(j, dst);
                            } else {
                                q.convert_row(j, dst);
                            }
                        });
                }))
            }
            Recipe::Stack(parts) => {
                let made = parts
                    .iter()
                    .map(|p| self.make(name, p))
                    .collect::<Result<Vec<_>, _>>()?;
                let len: usize = made.iter().map(|m| m.len()).sum();
                Ok(owned(len, |out| {
                    let mut at = 0;
                    for m in &made {
                        out[at..at + m.len()].copy_from_slice(m);
                        at += m.len();
                    }
                }))
            }
            Recipe::Computed(values) => Ok(owned(values.len() * 4, |out| {
                for (dst, v) in out.chunks_mut(4).zip(values) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            })),
        }
    }
}

/// The source row of output row `i` of a `rows`-row query or key matrix of `heads` heads, as llama.cpp's
/// converter permutes them: within each head, row `2j + t` of the output is row `t·half + j` of the file.
fn permuted_row(i: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads.max(1);
    let half = (hd / 2).max(1);
    if hd < 2 || !rows.is_multiple_of(heads) {
        return i;
    }
    let (h, r) = (i / hd, i % hd);
    let (j, t) = (r / 2, r % 2);
    h * hd + t * half + j
}

/// One MLX-quantized matrix's rows, converted one at a time.
struct MlxRows<'a> {
    w: &'a [u8],
    s: &'a [u8],
    b: &'a [u8],
    sdtype: DType,
    bits: usize,
    group: usize,
    cols: usize,
}

impl MlxRows<'_> {
    fn out_row_bytes(&self) -> usize {
        let blocks = self.cols / 32;
        if self.bits == 4 {
            blocks * 20
        } else {
            blocks * 34
        }
    }

    fn float(&self, bytes: &[u8], i: usize) -> f32 {
        match self.sdtype {
            DType::F16 => half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
            DType::BF16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
            _ => f32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ]),
        }
    }

    /// The 32 quantized values of row `r` from element `k0` (a multiple of 32): `bits` packed words.
    fn block(&self, r: usize, k0: usize) -> [u8; 32] {
        let per_word = 32 / self.bits;
        let first = 4 * (r * (self.cols / per_word) + k0 / per_word);
        let mask = (1u32 << self.bits) - 1;
        let mut q = [0u8; 32];
        for (w, values) in self.w[first..first + 4 * self.bits]
            .chunks_exact(4)
            .zip(q.chunks_mut(per_word))
        {
            let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            for (i, x) in values.iter_mut().enumerate() {
                *x = ((v >> (i * self.bits)) & mask) as u8;
            }
        }
        q
    }

    /// The scale and bias of the group holding element `k` of row `r`.
    fn group_of(&self, r: usize, k: usize) -> (f32, f32) {
        let g = r * (self.cols / self.group) + k / self.group;
        (self.float(self.s, g), self.float(self.b, g))
    }

    /// Writes row `r` as f32 values (`scale·q + bias`) into `dst`.
    fn dequantize_row(&self, r: usize, dst: &mut [u8]) {
        for (blk, out) in dst.chunks_mut(32 * 4).enumerate() {
            let k0 = blk * 32;
            let (scale, bias) = self.group_of(r, k0);
            for (q, o) in self.block(r, k0).iter().zip(out.chunks_mut(4)) {
                o.copy_from_slice(&(scale * f32::from(*q) + bias).to_le_bytes());
            }
        }
    }

    /// Writes row `r` as ggml blocks into `dst`.
    fn convert_row(&self, r: usize, dst: &mut [u8]) {
        for (blk, out) in dst
            .chunks_mut(if self.bits == 4 { 20 } else { 34 })
            .enumerate()
        {
            let k0 = blk * 32;
            let (scale, bias) = self.group_of(r, k0);
            let q = self.block(r, k0);
            if self.bits == 4 {
                // block_q4_1: d, m (f16), then 16 bytes: element j in the low nibble, j + 16 in the high.
                out[0..2].copy_from_slice(&half::f16::from_f32(scale).to_le_bytes());
                out[2..4].copy_from_slice(&half::f16::from_f32(bias).to_le_bytes());
                for j in 0..16 {
                    out[4 + j] = q[j] | (q[j + 16] << 4);
                }
            } else {
                // block_q8_0 of the dequantized values, as ggml's quantize_row_q8_0.
                let mut w = [0f32; 32];
                for (x, qv) in w.iter_mut().zip(q) {
                    *x = scale * f32::from(qv) + bias;
                }
                let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                for (j, x) in w.iter().enumerate() {
                    out[2 + j] = ((x * id).round() as i8) as u8;
                }
            }
        }
    }
}

/// Why a recipe could not be made.
enum Bad {
    Corrupt(String),
    Unsupported(String),
}

fn mlx_recipe(
    weight: &Stored,
    scales: &Stored,
    biases: &Stored,
    bits: usize,
    group: usize,
    permute: Option<usize>,
    dequantize: bool,
) -> Result<Recipe, Bad> {
    if bits != 4 && bits != 8 {
        return Err(Bad::Unsupported(format!(
            "MLX {bits}-bit quantization (ult reads 4 and 8 bits)"
        )));
    }
    if group == 0 || !group.is_multiple_of(32) {
        return Err(Bad::Unsupported(format!(
            "MLX groups of {group} (ult reads groups of 32, 64 or 128)"
        )));
    }
    let ws = &weight.tensor.shape;
    if weight.tensor.dtype != DType::U32 || ws.len() < 2 || ws.len() > 3 {
        return Err(Bad::Corrupt(format!(
            "packed weight of type {:?} and shape {ws:?}",
            weight.tensor.dtype
        )));
    }
    let cols = ws[ws.len() - 1] * 32 / bits;
    let mut groups_shape = ws.clone();
    if let Some(last) = groups_shape.last_mut() {
        *last = cols / group;
    }
    for (what, t) in [("scales", scales), ("biases", biases)] {
        if !matches!(t.tensor.dtype, DType::F32 | DType::F16 | DType::BF16)
            || t.tensor.shape != groups_shape
            || !cols.is_multiple_of(group)
        {
            return Err(Bad::Corrupt(format!(
                "{what} of type {:?} and shape {:?} beside a packed weight of shape {ws:?} ({bits} bits, groups of {group})",
                t.tensor.dtype, t.tensor.shape
            )));
        }
    }
    if scales.tensor.dtype != biases.tensor.dtype {
        return Err(Bad::Corrupt("scales and biases of different types".into()));
    }
    Ok(Recipe::Mlx {
        weight: weight.clone(),
        scales: scales.clone(),
        biases: biases.clone(),
        bits,
        group,
        cols,
        permute: permute.filter(|_| ws.len() == 2),
        dequantize,
    })
}

/// A recipe's tensor as it will be in memory.
fn meta_of(r: &Recipe) -> TensorMeta {
    match r {
        Recipe::Plain { src, .. } => TensorMeta {
            dtype: match src.tensor.dtype {
                DType::F16 => GgmlDType::F16,
                DType::BF16 => GgmlDType::BF16,
                _ => GgmlDType::F32,
            },
            dims: src.tensor.shape.clone(),
            offset: 0,
            bytes: (src.tensor.end - src.tensor.start) as u64,
        },
        Recipe::Mlx {
            weight,
            bits,
            cols,
            dequantize,
            ..
        } => {
            let mut dims = weight.tensor.shape.clone();
            if let Some(last) = dims.last_mut() {
                *last = *cols;
            }
            let elems: usize = dims.iter().product();
            let (dtype, bytes) = match (*dequantize, *bits) {
                (true, _) => (GgmlDType::F32, elems * 4),
                (false, 4) => (GgmlDType::Q4_1, elems / 32 * 20),
                (false, _) => (GgmlDType::Q8_0, elems / 32 * 34),
            };
            TensorMeta {
                dtype,
                dims,
                offset: 0,
                bytes: bytes as u64,
            }
        }
        Recipe::Stack(parts) => {
            let first = parts.first().map(meta_of);
            let mut m = first.unwrap_or(TensorMeta {
                dtype: GgmlDType::F32,
                dims: Vec::new(),
                offset: 0,
                bytes: 0,
            });
            m.dims.insert(0, parts.len());
            m.bytes *= parts.len() as u64;
            m
        }
        Recipe::Computed(v) => TensorMeta {
            dtype: GgmlDType::F32,
            dims: vec![v.len()],
            offset: 0,
            bytes: v.len() as u64 * 4,
        },
    }
}

/// The (bits, group size) of module `module` in a config's `quantization` block: its own entry (an
/// object, or `false` for an unquantized module), else the defaults.
fn quant_params(quant: Option<&Value>, module: &str) -> Option<(usize, usize)> {
    let q = quant?;
    let of = |v: &Value| {
        Some((
            v["bits"].as_u64()? as usize,
            v["group_size"].as_u64()? as usize,
        ))
    };
    match q.get(module) {
        Some(Value::Bool(false)) => None,
        Some(v) if v.is_object() => of(v),
        _ => of(q),
    }
}

/// The GGUF name, expert index and part ("weight", "bias", "scales", "biases") of a Hugging Face or MLX
/// tensor name; None for tensors the decoder does not use.
fn gguf_name(hf: &str) -> Option<(String, Option<usize>, &'static str)> {
    let (base, part) = hf.rsplit_once('.')?;
    let part = match part {
        "weight" => "weight",
        "bias" => "bias",
        "scales" => "scales",
        "biases" => "biases",
        _ => return None,
    };
    let suffix = if part == "bias" { "bias" } else { "weight" };
    let base = base.strip_prefix("language_model.").unwrap_or(base);
    let top = match base {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(t) = top {
        return Some((format!("{t}.{suffix}"), None, part));
    }
    let rest = base.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (rest, expert) = if let Some(e) = rest.strip_prefix("mlp.experts.") {
        let (idx, proj) = e.split_once('.')?;
        (
            format!("mlp.experts.{proj}"),
            Some(idx.parse::<usize>().ok()?),
        )
    } else {
        (rest.to_string(), None)
    };
    let name = match rest.as_str() {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        "mlp.switch_mlp.gate_proj" | "mlp.experts.gate_proj" => "ffn_gate_exps",
        "mlp.switch_mlp.up_proj" | "mlp.experts.up_proj" => "ffn_up_exps",
        "mlp.switch_mlp.down_proj" | "mlp.experts.down_proj" => "ffn_down_exps",
        _ => return None,
    };
    Some((format!("blk.{layer}.{name}.{suffix}"), expert, part))
}

/// The folder's safetensors files (from `model.safetensors.index.json`, else every `*.safetensors`) and
/// their tensors by name.
fn read_safetensors(dir: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, Stored>), EngineError> {
    let index = dir.join("model.safetensors.index.json");
    let mut names: Vec<String> = match std::fs::read_to_string(&index) {
        Ok(text) => {
            let json: Value =
                serde_json::from_str(&text).map_err(|e| EngineError::CorruptModel {
                    path: index.display().to_string(),
                    reason: e.to_string(),
                })?;
            let mut files: Vec<String> = json["weight_map"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, f)| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::read_dir(dir)
            .map_err(|e| EngineError::Io {
                path: dir.display().to_string(),
                source: e,
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect(),
        Err(e) => {
            return Err(EngineError::Io {
                path: index.display().to_string(),
                source: e,
            });
        }
    };
    names.sort();
    if names.is_empty() {
        return Err(EngineError::CorruptModel {
            path: dir.display().to_string(),
            reason: "no .safetensors files".into(),
        });
    }
    let mut files = Vec::new();
    let mut tensors = BTreeMap::new();
    for n in names {
        // Index entries name files in the folder; never follow one out of it.
        if n.contains('/') || n.contains('\\') || n == ".." {
            return Err(EngineError::CorruptModel {
                path: index.display().to_string(),
                reason: format!("weight file {n:?} is outside the folder"),
            });
        }
        let path = dir.join(&n);
        let header = SafetensorsHeader::read(&path)?;
        for (name, t) in header.tensors {
            tensors.insert(
                name,
                Stored {
                    file: files.len(),
                    tensor: t,
                },
            );
        }
        files.push(path);
    }
    Ok((files, tensors))
}

/// Llama 3's rope factors (`rope_scaling` of type llama3), as llama.cpp's converter computes
/// `rope_freqs.weight`.
fn llama3_rope_factors(scaling: &Value, base: f64, dim: usize) -> Vec<f32> {
    let factor = scaling["factor"].as_f64().unwrap_or(8.0);
    let low = scaling["low_freq_factor"].as_f64().unwrap_or(1.0);
    let high = scaling["high_freq_factor"].as_f64().unwrap_or(4.0);
    let old = scaling["original_max_position_embeddings"]
        .as_f64()
        .unwrap_or(8192.0);
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The source of a decoder: a GGUF file or a model folder, read for inspection and loading alike.
pub enum DecoderFiles {
    /// A GGUF file.
    Gguf(GgufHeader),
    /// A Hugging Face or MLX folder.
    Folder(HfModel),
}

impl DecoderFiles {
    /// Reads `path`: a folder with a config.json, else a GGUF file.
    pub fn read(path: &Path) -> Result<Self, EngineError> {
        if is_model_dir(path) {
            HfModel::read(path).map(Self::Folder)
        } else {
            GgufHeader::read(path).map(Self::Gguf)
        }
    }

    /// The header (a folder's in GGUF terms).
    pub fn header(&self) -> &GgufHeader {
        match self {
            Self::Gguf(h) => h,
            Self::Folder(m) => &m.header,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_gguf() {
        let n = gguf_name;
        assert_eq!(
            n("model.layers.3.self_attn.q_proj.weight"),
            Some(("blk.3.attn_q.weight".into(), None, "weight"))
        );
        assert_eq!(
            n("model.layers.0.self_attn.k_proj.bias"),
            Some(("blk.0.attn_k.bias".into(), None, "bias"))
        );
        assert_eq!(
            n("model.layers.1.mlp.switch_mlp.down_proj.scales"),
            Some(("blk.1.ffn_down_exps.weight".into(), None, "scales"))
        );
        assert_eq!(
            n("model.layers.2.mlp.experts.7.up_proj.weight"),
            Some(("blk.2.ffn_up_exps.weight".into(), Some(7), "weight"))
        );
        assert_eq!(
            n("model.layers.2.mlp.gate.weight"),
            Some(("blk.2.ffn_gate_inp.weight".into(), None, "weight"))
        );
        assert_eq!(
            n("model.embed_tokens.biases").map(|x| x.0),
            Some("token_embd.weight".into())
        );
        assert_eq!(n("model.rotary_emb.inv_freq"), None);
    }

    #[test]
    fn permutation_matches_llama_cpp() {
        // numpy: w.reshape(heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape), 2 heads of 4 rows.
        let rows: Vec<usize> = (0..8).map(|i| permuted_row(i, 8, 2)).collect();
        assert_eq!(rows, [0, 2, 1, 3, 4, 6, 5, 7]);
        let rows: Vec<usize> = (0..8).map(|i| permuted_row(i, 8, 1)).collect();
        assert_eq!(rows, [0, 4, 1, 5, 2, 6, 3, 7]);
    }

    #[test]
    fn quantization_overrides() {
        let q = serde_json::json!({"group_size": 64, "bits": 4,
            "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8},
            "model.layers.0.mlp.up_proj": false});
        assert_eq!(
            quant_params(Some(&q), "model.layers.0.self_attn.q_proj"),
            Some((4, 64))
        );
        assert_eq!(
            quant_params(Some(&q), "model.layers.0.mlp.gate"),
            Some((8, 64))
        );
        assert_eq!(quant_params(Some(&q), "model.layers.0.mlp.up_proj"), None);
        assert_eq!(quant_params(None, "x"), None);
    }

    /// Row 0 of `rows` converted to `dtype` blocks, as Candle dequantizes them.
    fn converted(rows: &MlxRows<'_>, dtype: GgmlDType) -> Vec<f32> {
        let mut out = vec![0u8; rows.out_row_bytes()];
        rows.convert_row(0, &mut out);
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &out,
            vec![1, rows.cols],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        q.dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn mlx_4bit_rows_become_q4_1_exactly() {
        // One row of 64 values in one group of 64: q = k % 16, scale 0.5, bias -1.
        let mut w = Vec::new();
        for word in 0..8u32 {
            let mut v = 0u32;
            for i in 0..8 {
                v |= ((word * 8 + i) % 16) << (4 * i);
            }
            w.extend_from_slice(&v.to_le_bytes());
        }
        let s = half::f16::from_f32(0.5).to_le_bytes();
        let b = half::f16::from_f32(-1.0).to_le_bytes();
        let rows = MlxRows {
            w: &w,
            s: &s,
            b: &b,
            sdtype: DType::F16,
            bits: 4,
            group: 64,
            cols: 64,
        };
        let deq = converted(&rows, GgmlDType::Q4_1);
        let want: Vec<f32> = (0..64).map(|k| 0.5 * (k % 16) as f32 - 1.0).collect();
        assert_eq!(deq, want);
    }

    #[test]
    fn mlx_8bit_rows_requantize_within_half_a_step() {
        let w: Vec<u8> = (0..32u32)
            .flat_map(|k| (k * 8).to_le_bytes())
            .collect::<Vec<_>>();
        // 32 words of 4 bytes hold 128 values; use one row of 128 in two groups of 64.
        let s: Vec<u8> = [0.01f32, 0.02]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [-1.0f32, 0.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let rows = MlxRows {
            w: &w,
            s: &s,
            b: &b,
            sdtype: DType::F32,
            bits: 8,
            group: 64,
            cols: 128,
        };
        let deq = converted(&rows, GgmlDType::Q8_0);
        for (k, got) in deq.iter().enumerate() {
            let (scale, bias) = if k < 64 { (0.01, -1.0) } else { (0.02, 0.5) };
            let exact = |k: usize| scale * f32::from(rows.block(0, k / 32 * 32)[k % 32]) + bias;
            let block = k / 32 * 32;
            let amax = (block..block + 32).fold(0f32, |m, j| m.max(exact(j).abs()));
            // Half of Q8_0's step (max |w| / 127 of the block) plus the f16 rounding of that step.
            let bound = amax / 127.0 / 2.0 + amax / 1000.0;
            assert!(
                (got - exact(k)).abs() <= bound,
                "{k}: {got} vs {}",
                exact(k)
            );
        }
    }
}
