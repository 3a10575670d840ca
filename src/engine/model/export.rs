//! Exporting a GGUF model as a Hugging Face directory: weights dequantized to f32 in
//! `model.safetensors` (q/k rows put back in Hugging Face order), `config.json`,
//! `generation_config.json`, `tokenizer.json` and `tokenizer_config.json` (with the chat
//! template), so `transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer`
//! load it offline. Used to compare adapterd with PyTorch/PEFT on the very same weights (the
//! PEFT reference fixtures, the training benchmark) and by `examples/export_hf.rs`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::config::{Arch, ModelConfig};
use super::load::read_gguf_header;
use super::ModelError;
use crate::engine::tokenizer::Tokenizer;

fn file_err(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Undoes the llama GGUF converter's q/k permutation: within each head, file row `2i + j` is
/// Hugging Face row `j·(hd/2) + i`. Written with tensor reshapes, independently of the
/// loader's byte moves (`load::unpermute_rows`), so comparing an exported copy with the GGUF
/// checks one against the other.
fn unpermute(w: Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::InvalidConfig(format!(
            "q/k weight [{rows}, {cols}] does not split into {heads} heads"
        )));
    }
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

/// Writes `out` (created if missing) as a Hugging Face model directory holding the weights of
/// the GGUF file `gguf`, dequantized to f32.
pub fn export_hf_dir(gguf: &Path, out: &Path) -> Result<(), ModelError> {
    let (ct, mut file) = read_gguf_header(gguf)?;
    let cfg = ModelConfig::from_gguf(&ct)?;
    let tokenizer =
        Tokenizer::from_gguf(&ct).map_err(|e| file_err(gguf, format!("tokenizer: {e}")))?;
    let dev = Device::Cpu;
    let mut get = |name: &str| -> Result<Tensor, ModelError> {
        ct.tensor(&mut file, name, &dev)
            .and_then(|t| t.dequantize(&dev))
            .map_err(|e| file_err(gguf, format!("tensor {name}: {e}")))
    };
    let permuted = matches!(cfg.arch, Arch::Llama | Arch::Mistral);

    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        get("token_embd.weight")?,
    );
    w.insert("model.norm.weight".into(), get("output_norm.weight")?);
    if !cfg.tie_word_embeddings {
        w.insert("lm_head.weight".into(), get("output.weight")?);
    }
    for i in 0..cfg.num_layers {
        let (g, h) = (format!("blk.{i}"), format!("model.layers.{i}"));
        let pairs = [
            ("attn_norm.weight", "input_layernorm.weight"),
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
            ("attn_v.weight", "self_attn.v_proj.weight"),
            ("attn_output.weight", "self_attn.o_proj.weight"),
            ("ffn_gate.weight", "mlp.gate_proj.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
            ("ffn_down.weight", "mlp.down_proj.weight"),
        ];
        for (from, to) in pairs {
            w.insert(format!("{h}.{to}"), get(&format!("{g}.{from}"))?);
        }
        let mut q = get(&format!("{g}.attn_q.weight"))?;
        let mut k = get(&format!("{g}.attn_k.weight"))?;
        if permuted {
            q = unpermute(q, cfg.num_heads)?;
            k = unpermute(k, cfg.num_kv_heads)?;
        }
        w.insert(format!("{h}.self_attn.q_proj.weight"), q);
        w.insert(format!("{h}.self_attn.k_proj.weight"), k);
        if cfg.arch.attention_bias() {
            for (from, to) in [
                ("attn_q", "q_proj"),
                ("attn_k", "k_proj"),
                ("attn_v", "v_proj"),
            ] {
                // Biases are never permuted by the converter for the architectures that have them.
                w.insert(
                    format!("{h}.self_attn.{to}.bias"),
                    get(&format!("{g}.{from}.bias"))?,
                );
            }
        }
    }

    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    candle_core::safetensors::save(&w, out.join("model.safetensors"))
        .map_err(|e| file_err(&out.join("model.safetensors"), e))?;

    let bos = tokenizer.bos_token_id();
    let eos = tokenizer.eos_token_ids().to_vec();
    let mut config = cfg.to_hf_json();
    if let Value::Object(m) = &mut config {
        m.insert("bos_token_id".into(), json!(bos));
        m.insert("eos_token_id".into(), json!(eos.first()));
    }
    let generation = json!({
        "bos_token_id": bos,
        "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) },
    });
    let token = |id: Option<u32>| id.map(|id| tokenizer.token_text(id));
    let mut tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
        "bos_token": token(bos),
        "eos_token": token(eos.first().copied()),
    });
    if let Some(t) = gguf_string(&ct, "tokenizer.chat_template") {
        tok_config["chat_template"] = json!(t);
    }
    let tokenizer_json = tokenizer
        .to_hf_json()
        .map_err(|e| file_err(gguf, format!("tokenizer: {e}")))?;
    let files = [
        ("config.json", pretty(&config)),
        ("generation_config.json", pretty(&generation)),
        ("tokenizer_config.json", pretty(&tok_config)),
        ("tokenizer.json", tokenizer_json),
    ];
    for (name, text) in files {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| file_err(&p, e))?;
    }
    Ok(())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn gguf_string(ct: &gguf_file::Content, key: &str) -> Option<String> {
    ct.metadata.get(key)?.to_string().ok().cloned()
}
