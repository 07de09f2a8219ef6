//! Model discovery: the folders of `[daemon] model_dirs`, read as the stores users already have. A folder
//! is recognised by its layout:
//!
//! - **Ollama's store** (`~/.ollama/models`): `manifests/<registry>/<namespace>/<model>/<tag>` JSON
//!   manifests (schema 2) whose `application/vnd.ollama.image.model` layer names the GGUF blob
//!   `blobs/sha256-<hex>`; the model is named as Ollama names it (`llama3.2:3b`, `namespace/model:tag`,
//!   `host/namespace/model:tag`), and its `params` layer's `num_ctx` becomes the context.
//! - **The Hugging Face hub cache** (`~/.cache/huggingface/hub`): `models--<org>--<name>/snapshots/<rev>/`,
//!   the revision `refs/main` names (else the newest); its GGUF files are `org/name` (one file) or
//!   `org/name/<file stem>` (several).
//! - **LM Studio's models folder** (`~/.lmstudio/models`, or any folder of `publisher/repo/*.gguf`): named
//!   `publisher/repo`, or `publisher/repo/<file stem>` when the repo holds several files.
//! - **Any other folder**: each `*.gguf` in it (and one level of subfolders), named by its file stem.
//!
//! Model folders (MLX or Hugging Face: a `config.json` beside `*.safetensors` weights) count as models
//! wherever a GGUF would: a subfolder of a plain folder (named by the subfolder), an LM Studio repo, a hub
//! cache snapshot. Their kind comes from `config.json`'s `model_type` (`bert`: embedding; any other: chat,
//! served as completion when the folder has no chat template). Split GGUFs (`-00001-of-00004.gguf`) are
//! skipped with a reason. Only file names, manifests and configs are read here; the weights are inspected
//! later, as configured models are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use ult_engine::ModelKind;

/// One model found in a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Its name, as the store names it.
    pub name: String,
    /// The GGUF file or the model folder.
    pub path: PathBuf,
    /// What the folder's config says it is (None for GGUF files: chat, unless models.toml says otherwise).
    pub kind: Option<ModelKind>,
    /// Where it came from, for Status (`ollama ~/.ollama/models`, …).
    pub origin: String,
    /// A context the store sets for it (Ollama's `num_ctx`).
    pub context: Option<usize>,
}

/// What one scan found and what it left out.
#[derive(Debug, Default)]
pub struct Scan {
    /// Models, in the order found (the first of a name wins).
    pub models: Vec<Discovered>,
    /// Files or folders skipped, each with why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The layout a folder was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Ollama's store.
    Ollama,
    /// The Hugging Face hub cache.
    HfCache,
    /// `publisher/repo/*.gguf` (LM Studio's layout).
    LmStudio,
    /// GGUF files, by file stem.
    Folder,
}

impl Layout {
    /// The name Status shows.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ollama => "ollama",
            Self::HfCache => "huggingface",
            Self::LmStudio => "lmstudio",
            Self::Folder => "folder",
        }
    }
}

/// How a folder is laid out.
pub fn layout_of(dir: &Path) -> Layout {
    if dir.join("manifests").is_dir() && dir.join("blobs").is_dir() {
        return Layout::Ollama;
    }
    let entries = || {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
    };
    if entries().any(|p| {
        p.is_dir()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("models--"))
    }) {
        return Layout::HfCache;
    }
    // LM Studio: no GGUF at the top, GGUFs or model folders two levels down (publisher/repo/…).
    let top_gguf = entries().any(|p| is_gguf(&p));
    let nested = entries().filter(|p| p.is_dir()).any(|publisher| {
        subdirs(&publisher)
            .iter()
            .any(|repo| is_model_folder(repo) || files(repo).iter().any(|f| is_gguf(f)))
    });
    if !top_gguf && nested {
        Layout::LmStudio
    } else {
        Layout::Folder
    }
}

/// Scans `dirs` in order.
pub fn scan(dirs: &[PathBuf]) -> Scan {
    let mut out = Scan::default();
    for dir in dirs {
        if !dir.is_dir() {
            out.skipped
                .push((dir.clone(), "not a folder (or not readable)".into()));
            continue;
        }
        let layout = layout_of(dir);
        let origin = format!("{} {}", layout.as_str(), dir.display());
        let found = match layout {
            Layout::Ollama => ollama(dir, &origin, &mut out.skipped),
            Layout::HfCache => hf_cache(dir, &origin, &mut out.skipped),
            Layout::LmStudio => lm_studio(dir, &origin, &mut out.skipped),
            Layout::Folder => folder(dir, &origin, &mut out.skipped),
        };
        for d in found {
            if out.models.iter().any(|m| m.name == d.name) {
                out.skipped.push((
                    d.path.clone(),
                    format!("the name {} is taken by an earlier folder", d.name),
                ));
            } else {
                out.models.push(d);
            }
        }
    }
    out
}

/// A folder with a `config.json` and safetensors weights (an MLX or Hugging Face model).
fn is_model_folder(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && files(dir).iter().any(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".safetensors"))
        })
}

/// The model folder `dir` named `name`, or why it is skipped.
fn model_folder(dir: &Path, name: &str, origin: &str) -> Result<Discovered, String> {
    if !is_model_folder(dir) {
        return Err("a config.json without .safetensors weights".into());
    }
    let config: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let kind = match config["model_type"].as_str() {
        Some("bert") => ModelKind::Embedding,
        _ => ModelKind::Chat,
    };
    Ok(Discovered {
        name: clean(name),
        path: dir.to_path_buf(),
        kind: Some(kind),
        origin: origin.to_string(),
        context: None,
    })
}

fn is_gguf(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn sorted(dir: &Path, want_dir: bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() == want_dir)
        .collect();
    v.sort();
    v
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    sorted(dir, true)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    sorted(dir, false)
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

/// Whether `file` is one part of a split GGUF (`name-00001-of-00004.gguf`).
fn is_split(file: &Path) -> bool {
    let s = stem(file);
    let five = |p: &str| p.len() == 5 && p.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = s.rsplitn(4, '-').collect();
    matches!(parts.as_slice(), [total, "of", index, ..] if five(total) && five(index))
}

/// A model name from store names: only the characters model names allow (others become '-').
fn clean(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The GGUF files of `dir` as models under `base` (one file: `base`; several: `base/stem`), skipping
/// split parts.
fn gguf_models(
    dir: &Path,
    base: &str,
    origin: &str,
    skipped: &mut Vec<(PathBuf, String)>,
) -> Vec<Discovered> {
    let mut ggufs: Vec<PathBuf> = Vec::new();
    for f in files(dir).into_iter().filter(|f| is_gguf(f)) {
        if is_split(&f) {
            skipped.push((f, "a part of a split GGUF (ult loads single files)".into()));
        } else {
            ggufs.push(f);
        }
    }
    let one = ggufs.len() == 1;
    ggufs
        .into_iter()
        .map(|f| Discovered {
            name: clean(&if one {
                base.to_string()
            } else {
                format!("{base}/{}", stem(&f))
            }),
            path: f,
            kind: None,
            origin: origin.to_string(),
            context: None,
        })
        .collect()
}

fn folder(dir: &Path, origin: &str, skipped: &mut Vec<(PathBuf, String)>) -> Vec<Discovered> {
    let mut out = Vec::new();
    for d in std::iter::once(dir.to_path_buf()).chain(subdirs(dir)) {
        if d.join("config.json").is_file() {
            let name = d.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            match model_folder(&d, name, origin) {
                Ok(m) => out.push(m),
                Err(why) => skipped.push((d.clone(), why)),
            }
            continue;
        }
        for f in files(&d).into_iter().filter(|f| is_gguf(f)) {
            if is_split(&f) {
                skipped.push((f, "a part of a split GGUF (ult loads single files)".into()));
                continue;
            }
            out.push(Discovered {
                name: clean(&stem(&f)),
                path: f,
                kind: None,
                origin: origin.to_string(),
                context: None,
            });
        }
    }
    out
}

fn lm_studio(dir: &Path, origin: &str, skipped: &mut Vec<(PathBuf, String)>) -> Vec<Discovered> {
    let mut out = Vec::new();
    for publisher in subdirs(dir) {
        for repo in subdirs(&publisher) {
            let base = format!(
                "{}/{}",
                publisher
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default(),
                repo.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
            );
            if repo.join("config.json").is_file() {
                match model_folder(&repo, &base, origin) {
                    Ok(m) => out.push(m),
                    Err(why) => skipped.push((repo.clone(), why)),
                }
                continue;
            }
            out.extend(gguf_models(&repo, &base, origin, skipped));
        }
    }
    out
}

fn hf_cache(dir: &Path, origin: &str, skipped: &mut Vec<(PathBuf, String)>) -> Vec<Discovered> {
    let mut out = Vec::new();
    for repo in subdirs(dir) {
        let Some(id) = repo
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("models--"))
        else {
            continue;
        };
        let base = id.replacen("--", "/", 1);
        let snapshots = repo.join("snapshots");
        let wanted = std::fs::read_to_string(repo.join("refs/main"))
            .ok()
            .map(|r| r.trim().to_string());
        let snapshot = match wanted.map(|r| snapshots.join(r)).filter(|p| p.is_dir()) {
            Some(s) => s,
            None => {
                // No refs/main: the newest snapshot.
                let mut all = subdirs(&snapshots);
                all.sort_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
                match all.pop() {
                    Some(s) => s,
                    None => continue,
                }
            }
        };
        let found = gguf_models(&snapshot, &base, origin, skipped);
        if found.is_empty() && snapshot.join("config.json").is_file() {
            match model_folder(&snapshot, &base, origin) {
                Ok(m) => out.push(m),
                Err(why) => skipped.push((snapshot, why)),
            }
        }
        out.extend(found);
    }
    out
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    layers: Vec<ManifestLayer>,
}

#[derive(Deserialize)]
struct ManifestLayer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
}

/// The Ollama name of the manifest at `registry/namespace/model/tag`: the default registry and the
/// `library` namespace are left out, as Ollama prints them.
fn ollama_name(parts: &[&str]) -> Option<String> {
    let [registry, namespace, model, tag] = parts else {
        return None;
    };
    Some(match (*registry, *namespace) {
        ("registry.ollama.ai", "library") => format!("{model}:{tag}"),
        ("registry.ollama.ai", ns) => format!("{ns}/{model}:{tag}"),
        (host, ns) => format!("{host}/{ns}/{model}:{tag}"),
    })
}

fn blob(dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(dir.join("blobs").join(format!("sha256-{hex}")))
}

fn ollama(dir: &Path, origin: &str, skipped: &mut Vec<(PathBuf, String)>) -> Vec<Discovered> {
    let root = dir.join("manifests");
    let mut manifests = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for p in subdirs(&d) {
            stack.push(p);
        }
        manifests.extend(files(&d));
    }
    manifests.sort();
    let mut out = BTreeMap::new();
    for m in manifests {
        let rel = m.strip_prefix(&root).unwrap_or(&m);
        let parts: Vec<&str> = rel.iter().filter_map(|s| s.to_str()).collect();
        let Some(name) = ollama_name(&parts) else {
            skipped.push((
                m.clone(),
                "not at manifests/registry/namespace/model/tag".into(),
            ));
            continue;
        };
        let parsed = std::fs::read_to_string(&m)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Manifest>(&t).map_err(|e| e.to_string()));
        let manifest = match parsed {
            Ok(x) if x.schema_version == 2 => x,
            Ok(x) => {
                skipped.push((
                    m,
                    format!("manifest schema {} (ult reads 2)", x.schema_version),
                ));
                continue;
            }
            Err(e) => {
                skipped.push((m, format!("not a manifest: {e}")));
                continue;
            }
        };
        let layer = |kind: &str| {
            manifest
                .layers
                .iter()
                .find(|l| l.media_type == format!("application/vnd.ollama.image.{kind}"))
        };
        let Some(model) = layer("model") else {
            skipped.push((m, "no model layer (an adapter or a projector only?)".into()));
            continue;
        };
        let Some(path) = blob(dir, &model.digest).filter(|p| p.is_file()) else {
            skipped.push((m, format!("its model blob {} is missing", model.digest)));
            continue;
        };
        if layer("adapter").is_some() || layer("projector").is_some() {
            skipped.push((
                m,
                "it needs an adapter or a vision projector (ult loads the model alone)".into(),
            ));
            continue;
        }
        let context = layer("params")
            .and_then(|l| blob(dir, &l.digest))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("num_ctx").and_then(serde_json::Value::as_u64))
            .and_then(|c| usize::try_from(c).ok());
        out.insert(
            name.clone(),
            Discovered {
                name: clean(&name),
                path,
                kind: None,
                origin: origin.to_string(),
                context,
            },
        );
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ult-discover-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn touch(p: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn split_parts_are_recognised() {
        assert!(is_split(Path::new(
            "a/Qwen3-235B-Q4_K_M-00001-of-00004.gguf"
        )));
        assert!(!is_split(Path::new("a/SmolLM2-135M-Instruct.Q4_1.gguf")));
        assert!(!is_split(Path::new("a/model-of-things.gguf")));
    }

    #[test]
    fn ollama_names_drop_the_default_registry_and_library() {
        let n = |p: &[&str]| ollama_name(p).unwrap();
        assert_eq!(
            n(&["registry.ollama.ai", "library", "llama3.2", "3b"]),
            "llama3.2:3b"
        );
        assert_eq!(
            n(&["registry.ollama.ai", "me", "tiny", "latest"]),
            "me/tiny:latest"
        );
        assert_eq!(
            n(&["hf.co", "org", "repo", "Q4_K_M"]),
            "hf.co/org/repo:Q4_K_M"
        );
        assert!(ollama_name(&["library", "x"]).is_none());
    }

    #[test]
    fn each_layout_is_recognised_and_named() {
        let digest = "ab".repeat(32);
        // Ollama.
        let o = tmp("ollama");
        touch(&o.join(format!("blobs/sha256-{digest}")), b"GGUF");
        touch(
            &o.join(format!("blobs/sha256-{}", "cd".repeat(32))),
            br#"{"num_ctx": 4096}"#,
        );
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
               "layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{digest}","size":4}},
                         {{"mediaType":"application/vnd.ollama.image.params","digest":"sha256:{}","size":17}}]}}"#,
            "cd".repeat(32)
        );
        touch(
            &o.join("manifests/registry.ollama.ai/library/smollm2/135m"),
            manifest.as_bytes(),
        );
        touch(
            &o.join("manifests/registry.ollama.ai/library/broken/latest"),
            b"{not json",
        );
        // LM Studio.
        let l = tmp("lmstudio");
        touch(
            &l.join("lmstudio-community/SmolLM2-GGUF/SmolLM2-Q4_1.gguf"),
            b"GGUF",
        );
        touch(&l.join("lmstudio-community/Two-GGUF/a.gguf"), b"GGUF");
        touch(&l.join("lmstudio-community/Two-GGUF/b.gguf"), b"GGUF");
        touch(&l.join("mlx-community/Qwen3-4bit/config.json"), b"{}");
        touch(
            &l.join("mlx-community/Qwen3-0.6B-4bit/config.json"),
            br#"{"model_type": "qwen3"}"#,
        );
        touch(
            &l.join("mlx-community/Qwen3-0.6B-4bit/model.safetensors"),
            b"",
        );
        // The Hugging Face cache.
        let h = tmp("hf");
        let repo = h.join("models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF");
        touch(&repo.join("refs/main"), b"0123abcd\n");
        touch(&repo.join("snapshots/0123abcd/smollm2.gguf"), b"GGUF");
        touch(&repo.join("snapshots/0000old/old.gguf"), b"GGUF");
        // A plain folder.
        let f = tmp("folder");
        touch(&f.join("tiny.gguf"), b"GGUF");
        touch(&f.join("sub/other.gguf"), b"GGUF");
        touch(&f.join("big-00001-of-00002.gguf"), b"GGUF");
        touch(&f.join("minilm/config.json"), br#"{"model_type": "bert"}"#);
        touch(&f.join("minilm/model.safetensors"), b"");

        assert_eq!(layout_of(&o), Layout::Ollama);
        assert_eq!(layout_of(&l), Layout::LmStudio);
        assert_eq!(layout_of(&h), Layout::HfCache);
        assert_eq!(layout_of(&f), Layout::Folder);
        let s = scan(&[o.clone(), l.clone(), h.clone(), f.clone(), o.join("nope")]);
        let names: Vec<&str> = s.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "smollm2:135m",
                "lmstudio-community/SmolLM2-GGUF",
                "lmstudio-community/Two-GGUF/a",
                "lmstudio-community/Two-GGUF/b",
                "mlx-community/Qwen3-0.6B-4bit",
                "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                "tiny",
                "minilm",
                "other",
            ]
        );
        let kind = |n: &str| s.models.iter().find(|m| m.name == n).unwrap().kind;
        assert_eq!(kind("mlx-community/Qwen3-0.6B-4bit"), Some(ModelKind::Chat));
        assert_eq!(kind("minilm"), Some(ModelKind::Embedding));
        assert_eq!(kind("tiny"), None);
        assert_eq!(
            s.models.iter().find(|m| m.name == "minilm").unwrap().path,
            f.join("minilm")
        );
        let smol = &s.models[0];
        assert_eq!(smol.path, o.join(format!("blobs/sha256-{digest}")));
        assert_eq!(smol.context, Some(4096));
        assert!(smol.origin.starts_with("ollama "));
        assert_eq!(
            s.models[5].path,
            repo.join("snapshots/0123abcd/smollm2.gguf")
        );
        let why = |needle: &str| {
            s.skipped
                .iter()
                .any(|(p, w)| p.to_string_lossy().contains(needle) && !w.is_empty())
        };
        assert!(why("broken"), "{:?}", s.skipped);
        assert!(why("Qwen3-4bit"), "{:?}", s.skipped);
        assert!(why("big-00001"), "{:?}", s.skipped);
        assert!(why("nope"), "{:?}", s.skipped);
        for d in [o, l, h, f] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
