//! BERT sentence embeddings from safetensors (all-MiniLM-L6-v2): our own header validation and encoder,
//! mean pooling over the tokens, then L2 normalisation, as sentence-transformers does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::ops::softmax_last_dim;

use super::EngineError;

/// One tensor in a safetensors file.
#[derive(Debug, Clone)]
pub struct SafeTensor {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    /// End of the range (exclusive).
    pub end: usize,
}

/// A validated safetensors header.
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    /// The file.
    pub path: PathBuf,
    /// Tensors by name.
    pub tensors: BTreeMap<String, SafeTensor>,
    /// Bytes of tensor data.
    pub data_bytes: u64,
}

impl SafetensorsHeader {
    /// Reads the JSON header of `path` and checks that every tensor's byte range lies in the file and
    /// matches its dtype and shape (a header that lies is refused, not trusted).
    pub fn read(path: &Path) -> std::result::Result<Self, EngineError> {
        use std::io::Read;
        let corrupt = |reason: String| EngineError::CorruptModel {
            path: path.display().to_string(),
            reason,
        };
        let io = |e: std::io::Error| EngineError::Io {
            path: path.display().to_string(),
            source: e,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| corrupt("shorter than its 8-byte header length".into()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > 100_000_000 || 8 + header_len > file_len {
            return Err(corrupt(format!(
                "header length {header_len} does not fit in a file of {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let json: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| corrupt(format!("header is not JSON: {e}")))?;
        let object = json
            .as_object()
            .ok_or_else(|| corrupt("header is not a JSON object".into()))?;
        let data_start = 8 + header_len;
        let data_bytes = file_len - data_start;
        let mut tensors = BTreeMap::new();
        for (name, t) in object {
            if name == "__metadata__" {
                continue;
            }
            let dtype = match t["dtype"].as_str() {
                Some("F32") => DType::F32,
                Some("F16") => DType::F16,
                Some("BF16") => DType::BF16,
                Some("I64") => DType::I64,
                Some("U32") => DType::U32,
                Some("U8") => DType::U8,
                other => {
                    return Err(corrupt(format!(
                        "tensor {name}: unsupported dtype {other:?}"
                    )));
                }
            };
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .ok_or_else(|| corrupt(format!("tensor {name}: no shape")))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| corrupt(format!("tensor {name}: bad shape")))?;
            let offsets = t["data_offsets"]
                .as_array()
                .filter(|o| o.len() == 2)
                .ok_or_else(|| corrupt(format!("tensor {name}: no data_offsets")))?;
            let (Some(begin), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
                return Err(corrupt(format!("tensor {name}: bad data_offsets")));
            };
            let elems = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let expected = elems.and_then(|e| e.checked_mul(dtype.size_in_bytes()));
            if end < begin || end > data_bytes || Some((end - begin) as usize) != expected {
                return Err(corrupt(format!(
                    "tensor {name}: bytes {begin}..{end} do not hold a {dtype:?} tensor of shape {shape:?} within {data_bytes} data bytes"
                )));
            }
            tensors.insert(
                name.clone(),
                SafeTensor {
                    dtype,
                    shape,
                    start: (data_start + begin) as usize,
                    end: (data_start + end) as usize,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            data_bytes,
        })
    }
}

/// BERT hyper-parameters from config.json.
#[derive(Debug, Clone)]
pub struct BertConfig {
    /// Hidden size.
    pub hidden: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Position embeddings available.
    pub max_positions: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
}

impl BertConfig {
    /// Reads `config.json`.
    pub fn read(path: &Path) -> std::result::Result<Self, EngineError> {
        let corrupt = |reason: String| EngineError::CorruptModel {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let get = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| corrupt(format!("config.json lacks {k}")))
        };
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        if heads == 0 || hidden % heads != 0 {
            return Err(corrupt(format!(
                "{hidden} hidden is not divisible by {heads} heads"
            )));
        }
        if v["model_type"].as_str().is_some_and(|t| t != "bert") {
            return Err(EngineError::UnsupportedArchitecture {
                path: path.display().to_string(),
                arch: v["model_type"].as_str().unwrap_or_default().to_string(),
            });
        }
        Ok(Self {
            hidden,
            layers: get("num_hidden_layers")?,
            heads,
            max_positions: get("max_position_embeddings")?,
            eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-12),
        })
    }
}

struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.w, &self.b, self.eps as f32)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
}

/// A loaded BERT encoder with sentence-transformers pooling.
pub struct Bert {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
}

impl Bert {
    /// Loads the encoder from a mapped safetensors file.
    pub fn load(
        header: &SafetensorsHeader,
        data: &[u8],
        config: BertConfig,
        device: &Device,
        progress: &(dyn Fn(u64) + Sync),
    ) -> std::result::Result<Self, EngineError> {
        let get = |name: &str| -> std::result::Result<Tensor, EngineError> {
            let t = header
                .tensors
                .get(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    path: header.path.display().to_string(),
                    name: name.to_string(),
                })?;
            let bytes = data
                .get(t.start..t.end)
                .ok_or_else(|| EngineError::CorruptModel {
                    path: header.path.display().to_string(),
                    reason: format!("tensor {name} lies outside the mapped file"),
                })?;
            let tensor = Tensor::from_raw_buffer(bytes, t.dtype, &t.shape, device)
                .and_then(|x| x.to_dtype(DType::F32))
                .map_err(|e| EngineError::candle(format!("reading {name}"), e))?;
            progress(bytes.len() as u64);
            Ok(tensor)
        };
        let linear = |p: &str| -> std::result::Result<Linear, EngineError> {
            Ok(Linear {
                w: get(&format!("{p}.weight"))?,
                b: get(&format!("{p}.bias"))?,
            })
        };
        let ln = |p: &str| -> std::result::Result<LayerNorm, EngineError> {
            Ok(LayerNorm {
                w: get(&format!("{p}.weight"))?,
                b: get(&format!("{p}.bias"))?,
                eps: config.eps,
            })
        };
        let layers = (0..config.layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    q: linear(&format!("{p}.attention.self.query"))?,
                    k: linear(&format!("{p}.attention.self.key"))?,
                    v: linear(&format!("{p}.attention.self.value"))?,
                    o: linear(&format!("{p}.attention.output.dense"))?,
                    attn_ln: ln(&format!("{p}.attention.output.LayerNorm"))?,
                    inter: linear(&format!("{p}.intermediate.dense"))?,
                    out: linear(&format!("{p}.output.dense"))?,
                    out_ln: ln(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<std::result::Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            word: get("embeddings.word_embeddings.weight")?,
            position: get("embeddings.position_embeddings.weight")?,
            token_type: get("embeddings.token_type_embeddings.weight")?,
            emb_ln: ln("embeddings.LayerNorm")?,
            layers,
            config,
            device: device.clone(),
        })
    }

    /// The longest input in tokens (position embeddings available).
    pub fn max_positions(&self) -> usize {
        self.config.max_positions
    }

    /// The embedding of one tokenized input ([CLS] … [SEP]): mean-pooled and L2-normalised.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let n = ids.len();
        let ids_t = Tensor::new(ids, &self.device)?;
        let positions = Tensor::arange(0u32, n as u32, &self.device)?;
        let types = Tensor::zeros(n, DType::U32, &self.device)?;
        let x = (self.word.index_select(&ids_t, 0)?
            + self.position.index_select(&positions, 0)?)?
        .add(&self.token_type.index_select(&types, 0)?)?;
        let mut x = self.emb_ln.forward(&x.unsqueeze(0)?)?;
        let heads = self.config.heads;
        let hd = self.config.hidden / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let split = |t: Tensor| -> Result<Tensor> {
                t.reshape((1, n, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = split(l.q.forward(&x)?)?;
            let k = split(l.k.forward(&x)?)?;
            let v = split(l.v.forward(&x)?)?;
            let probs = softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((1, n, self.config.hidden))?;
            x = l.attn_ln.forward(&(l.o.forward(&ctx)? + &x)?)?;
            let h = l.inter.forward(&x)?.gelu_erf()?;
            x = l.out_ln.forward(&(l.out.forward(&h)? + &x)?)?;
        }
        let pooled = x.mean(1)?.squeeze(0)?;
        let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        pooled
            .broadcast_div(&norm.clamp(1e-12, f64::MAX)?)?
            .to_vec1::<f32>()
    }
}
