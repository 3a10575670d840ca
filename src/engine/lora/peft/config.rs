//! `adapter_config.json`: the fields PEFT writes for a LoRA adapter, checked and resolved into
//! what the weight loader needs — which module paths are targeted, and each module's rank and
//! alpha after `rank_pattern` / `alpha_pattern`. Fields we do not use are ignored, as PEFT
//! itself ignores fields it does not know; fields whose meaning we cannot honour are refused.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::{LoraError, LoraLimits};
use crate::engine::lora::Module;
use crate::engine::model::config::ModelConfig;

/// PEFT's defaults for fields a config may omit (`LoraConfig` in peft 0.x).
const DEFAULT_R: usize = 8;
const DEFAULT_ALPHA: f64 = 8.0;
/// Largest `adapter_config.json` accepted. PEFT writes about 1 KB; the bound keeps a hostile
/// config (a million `rank_pattern` keys) from costing more than a moment to check.
pub(super) const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The validated config.
#[derive(Debug)]
pub(super) struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// Literal module-path suffixes, each ending in one of the seven module names
    /// (`q_proj`, or `layers.3.self_attn.q_proj`), matched the way PEFT matches a list.
    targets: Vec<String>,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f64)>,
}

/// A module's rank and scale, and where the rank came from (for error messages).
pub(super) struct Resolved {
    pub rank: usize,
    pub rank_field: String,
    pub scale: f64,
}

#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    target_modules: Option<Value>,
    use_rslora: Option<bool>,
    fan_in_fan_out: Option<bool>,
    bias: Option<String>,
    use_dora: Option<bool>,
    modules_to_save: Option<Vec<String>>,
    rank_pattern: Option<Ordered<usize>>,
    alpha_pattern: Option<Ordered<f64>>,
    layer_replication: Option<Value>,
    lora_bias: Option<bool>,
}

/// The module path PEFT matches patterns and targets against: the key of the module in the
/// base `LlamaForCausalLM` (`model.layers.3.self_attn.q_proj`).
pub(super) fn module_path(layer: usize, module: Module) -> String {
    format!(
        "model.layers.{layer}.{}.{}",
        module.hf_parent(),
        module.hf_name()
    )
}

impl AdapterConfig {
    pub fn parse(bytes: &[u8], base: &ModelConfig, limits: &LoraLimits) -> Result<Self, LoraError> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(LoraError::config(
                "adapter_config.json",
                format!(
                    "the file is {} bytes, over the limit of {MAX_CONFIG_BYTES} bytes",
                    bytes.len()
                ),
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "adapter_config.json".into()
            } else {
                path
            };
            LoraError::config(field, e.into_inner().to_string())
        })?;

        if let Some(t) = &raw.peft_type {
            if !t.eq_ignore_ascii_case("LORA") {
                return Err(LoraError::unsupported(
                    "peft_type",
                    format!("peft_type `{t}` is not supported (only LORA)"),
                ));
            }
        }
        if raw.use_dora == Some(true) {
            return Err(LoraError::unsupported("use_dora", "DoRA is not supported"));
        }
        if raw.fan_in_fan_out == Some(true) {
            // Only GPT-2-style Conv1D layers store weights transposed; llama's nn.Linear never do,
            // so such an adapter was made for another architecture.
            return Err(LoraError::unsupported(
                "fan_in_fan_out",
                "fan_in_fan_out = true is not supported (llama-family projections are not transposed)",
            ));
        }
        if let Some(b) = &raw.bias {
            if b != "none" {
                return Err(LoraError::unsupported(
                    "bias",
                    format!("bias = `{b}` is not supported (bias training)"),
                ));
            }
        }
        if raw.lora_bias == Some(true) {
            return Err(LoraError::unsupported(
                "lora_bias",
                "lora_bias = true is not supported (bias training)",
            ));
        }
        if let Some(m) = raw.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(LoraError::unsupported(
                "modules_to_save",
                format!("modules_to_save {m:?} is not supported (fully trained embedding, lm_head or other modules)"),
            ));
        }
        if raw.layer_replication.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(LoraError::unsupported(
                "layer_replication",
                "layer_replication is not supported (it changes the base model's layer stack)",
            ));
        }

        let r = raw.r.unwrap_or(DEFAULT_R);
        check_rank("r", r, limits)?;
        let lora_alpha = raw.lora_alpha.unwrap_or(DEFAULT_ALPHA);
        check_alpha("lora_alpha", lora_alpha)?;

        let targets = parse_targets(raw.target_modules.as_ref(), base)?;

        let rank_pattern = raw.rank_pattern.map(|o| o.0).unwrap_or_default();
        for (key, rank) in &rank_pattern {
            let field = format!("rank_pattern.{key}");
            check_pattern_key(&field, key)?;
            check_rank(&field, *rank, limits)?;
        }
        let alpha_pattern = raw.alpha_pattern.map(|o| o.0).unwrap_or_default();
        for (key, alpha) in &alpha_pattern {
            let field = format!("alpha_pattern.{key}");
            check_pattern_key(&field, key)?;
            check_alpha(&field, *alpha)?;
        }

        Ok(Self {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora.unwrap_or(false),
            targets,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// Whether the module at `path` is one the config targets. PEFT's rule for a list: the
    /// module's key equals an entry or ends with `.` + the entry.
    pub fn is_target(&self, path: &str) -> bool {
        self.targets.iter().any(|t| suffix_is(path, t))
    }

    /// Rank and scale of the module at `path`. PEFT takes, separately for rank and alpha, the
    /// first pattern key (in file order) that matches, and falls back to `r` / `lora_alpha`.
    pub fn resolve(&self, path: &str) -> Resolved {
        let (rank, rank_field) = match self
            .rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, path))
        {
            Some((k, v)) => (*v, format!("rank_pattern.{k}")),
            None => (self.r, "r".to_owned()),
        };
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, path))
            .map_or(self.lora_alpha, |(_, v)| *v);
        Resolved {
            rank,
            rank_field,
            scale: scale(alpha, rank, self.use_rslora),
        }
    }

    /// The targeted module names (`q_proj`, …), sorted and deduplicated.
    pub fn module_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .targets
            .iter()
            .filter_map(|t| t.rsplit('.').next())
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT `LoraLayer.update_layer`).
pub(super) fn scale(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    let r = rank as f64;
    if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }
}

fn check_rank(field: &str, rank: usize, limits: &LoraLimits) -> Result<(), LoraError> {
    if rank == 0 {
        return Err(LoraError::config(field, "rank must be positive"));
    }
    if rank > limits.max_rank {
        return Err(LoraError::config(
            field,
            format!(
                "rank {rank} is over this server's limit of {}",
                limits.max_rank
            ),
        ));
    }
    Ok(())
}

fn check_alpha(field: &str, alpha: f64) -> Result<(), LoraError> {
    if !alpha.is_finite() {
        return Err(LoraError::config(field, "alpha must be a finite number"));
    }
    Ok(())
}

/// target_modules: a list of names (or path suffixes), `"all-linear"`, a single module name, or
/// absent (PEFT then uses its per-architecture default, `["q_proj", "v_proj"]` for llama,
/// mistral and qwen2). A string is a regular expression to PEFT; we have no regex engine that
/// matches Python's, so any string but a plain module name is refused rather than guessed at.
fn parse_targets(value: Option<&Value>, base: &ModelConfig) -> Result<Vec<String>, LoraError> {
    const FIELD: &str = "target_modules";
    let supported = || {
        Module::ALL
            .iter()
            .map(|m| m.hf_name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entries: Vec<String> = match value {
        None | Some(Value::Null) => vec!["q_proj".into(), "v_proj".into()],
        Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
            Module::ALL.iter().map(|m| m.hf_name().to_owned()).collect()
        }
        Some(Value::String(s)) if Module::from_hf_name(s).is_some() => vec![s.clone()],
        Some(Value::String(s)) => {
            return Err(LoraError::unsupported(
                FIELD,
                format!(
                    "a regular expression (`{s}`) is not supported; list module names from: {}",
                    supported()
                ),
            ))
        }
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => out.push(s.clone()),
                    other => {
                        return Err(LoraError::config(
                            format!("{FIELD}[{i}]"),
                            format!("expected a module name, got {other}"),
                        ))
                    }
                }
            }
            out
        }
        Some(other) => {
            return Err(LoraError::config(
                FIELD,
                format!("expected a list of module names, got {other}"),
            ))
        }
    };
    if entries.is_empty() {
        return Err(LoraError::config(FIELD, "the list is empty"));
    }
    // Repeats change nothing; dropping them keeps the checks below linear in what is distinct.
    let mut entries = entries;
    entries.sort();
    entries.dedup();
    for entry in &entries {
        let last = entry.rsplit('.').next().unwrap_or(entry);
        let known = Module::from_hf_name(last).is_some();
        let exists = known
            && (0..base.num_layers)
                .flat_map(|l| Module::ALL.map(|m| module_path(l, m)))
                .any(|p| suffix_is(&p, entry));
        if !exists {
            return Err(LoraError::unsupported(
                FIELD,
                format!(
                    "the module `{entry}` is not supported (adaptable modules: {})",
                    supported()
                ),
            ));
        }
    }
    Ok(entries)
}

/// `path == suffix` or `path` ends with `.` + `suffix`.
fn suffix_is(path: &str, suffix: &str) -> bool {
    path.strip_suffix(suffix)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// Pattern keys are regular expressions to PEFT. The ones people write are module names or
/// dotted paths, where the only special character is `.`; anything else would need a regex
/// engine, so it is refused instead of silently never matching.
fn check_pattern_key(field: &str, key: &str) -> Result<(), LoraError> {
    const META: &[char] = &[
        '*', '+', '?', '(', ')', '[', ']', '{', '}', '|', '^', '$', '\\',
    ];
    if key.is_empty() {
        return Err(LoraError::config(field, "empty pattern key"));
    }
    if key.contains(META) {
        return Err(LoraError::unsupported(
            field,
            "a regular-expression pattern key is not supported (use a module name or a dotted module path)",
        ));
    }
    Ok(())
}

/// PEFT's `get_pattern_key`: `re.match(rf"(.*\.)?({key})$", path)`. With `.` the only special
/// character (see [`check_pattern_key`]) that means: some suffix of `path` of the key's length,
/// either all of `path` or preceded by a `.`, matches the key character by character, where a
/// `.` in the key matches any character.
pub(super) fn pattern_matches(key: &str, path: &str) -> bool {
    let key: Vec<char> = key.chars().collect();
    let path: Vec<char> = path.chars().collect();
    let Some(start) = path.len().checked_sub(key.len()) else {
        return false;
    };
    if start > 0 && path[start - 1] != '.' {
        return false;
    }
    key.iter()
        .zip(&path[start..])
        .all(|(k, p)| *k == '.' || k == p)
}

/// A JSON object read in file order: PEFT takes the first matching pattern key, so order
/// matters, and serde_json's map (without `preserve_order`) would sort the keys.
struct Ordered<T>(Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping module names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, T)> = Vec::new();
                // Where each key sits in `out`: a repeated key is found in O(1), so many keys
                // cost linear time, not quadratic.
                let mut index: HashMap<String, usize> = HashMap::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    // Python's json keeps the last value of a repeated key, at the first one's place.
                    match index.get(&k) {
                        Some(&i) => out[i].1 = v,
                        None => {
                            index.insert(k.clone(), out.len());
                            out.push((k, v));
                        }
                    }
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}
