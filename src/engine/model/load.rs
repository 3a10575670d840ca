//! Loading weights into [`Llama`]: a GGUF file (matrices stay quantized; GGUF's q/k row
//! permutation for interleaved RoPE is undone on the raw blocks, losslessly) or a Hugging Face
//! directory (config.json + *.safetensors, sharded or not, f32/f16/bf16).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{ggml_file, gguf_file, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, ModelConfig};
use super::linear::{Linear, Weight};
use super::llama::{Attention, Kernels, Layer, Llama, Mlp};
use super::qmatmul::QWeight;
use super::ModelError;

fn file_err(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Opens a GGUF file and reads its header (metadata and tensor index, not the weights).
pub fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, File), ModelError> {
    let mut file = File::open(path).map_err(|e| file_err(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| file_err(path, format!("not a readable GGUF file: {e}")))?;
    Ok((content, file))
}

/// Loads a GGUF model whose header was read by [`read_gguf_header`]. `Kernels::Native` (CPU
/// only) repacks Q4_0/Q4_1/Q8_0 matrices for adapterd's kernel; `Portable` keeps candle's form.
pub fn load_gguf(
    path: &Path,
    ct: &gguf_file::Content,
    file: &mut File,
    device: &Device,
    kernels: Kernels,
) -> Result<Llama, ModelError> {
    let native = check_kernels(device, kernels)?;
    let cfg = ModelConfig::from_gguf(ct)?;
    let qlinear = |w: QTensor, bias: Option<Tensor>| qlinear(w, bias, native);
    let mut get = |name: &str| -> Result<QTensor, ModelError> {
        ct.tensor(file, name, device)
            .map_err(|e| file_err(path, format!("tensor {name}: {e}")))
    };
    // The llama converter permutes q/k rows so interleaved RoPE reproduces the original
    // half-rotated one; qwen2 files are written unpermuted.
    let permuted = matches!(cfg.arch, Arch::Llama | Arch::Mistral);

    let embed_q = get("token_embd.weight")?;
    let embed = embed_q.dequantize(device)?;
    let norm = get("output_norm.weight")?.dequantize(device)?;
    let lm_head = if cfg.tie_word_embeddings {
        qlinear(embed_q, None)?
    } else {
        qlinear(get("output.weight")?, None)?
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("blk.{i}");
        let mut bias = |name: &str| -> Result<Option<Tensor>, ModelError> {
            if cfg.arch.attention_bias() {
                Ok(Some(get(&format!("{p}.{name}.bias"))?.dequantize(device)?))
            } else {
                Ok(None)
            }
        };
        let (bq, bk, bv) = (bias("attn_q")?, bias("attn_k")?, bias("attn_v")?);
        let mut wq = get(&format!("{p}.attn_q.weight"))?;
        let mut wk = get(&format!("{p}.attn_k.weight"))?;
        if permuted {
            wq = unpermute_rows(&wq, cfg.num_heads, device)?;
            wk = unpermute_rows(&wk, cfg.num_kv_heads, device)?;
        }
        layers.push(Layer {
            input_norm: get(&format!("{p}.attn_norm.weight"))?.dequantize(device)?,
            attn: Attention {
                q_proj: qlinear(wq, bq)?,
                k_proj: qlinear(wk, bk)?,
                v_proj: qlinear(get(&format!("{p}.attn_v.weight"))?, bv)?,
                o_proj: qlinear(get(&format!("{p}.attn_output.weight"))?, None)?,
            },
            post_attn_norm: get(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?,
            mlp: Mlp {
                gate_proj: qlinear(get(&format!("{p}.ffn_gate.weight"))?, None)?,
                up_proj: qlinear(get(&format!("{p}.ffn_up.weight"))?, None)?,
                down_proj: qlinear(get(&format!("{p}.ffn_down.weight"))?, None)?,
            },
        });
    }
    check_shapes(&cfg, &embed, &layers)?;
    let mut model = Llama::new(cfg, embed, layers, norm, lm_head, device)?;
    if !native {
        model.use_portable_kernels();
    }
    Ok(model)
}

/// Whether the native kernels run; they exist for the CPU alone.
fn check_kernels(device: &Device, kernels: Kernels) -> Result<bool, ModelError> {
    match kernels {
        Kernels::Native if !device.is_cpu() => Err(ModelError::InvalidConfig(
            "adapterd's native kernels run on the CPU only".into(),
        )),
        Kernels::Native => Ok(true),
        Kernels::Portable => Ok(false),
    }
}

fn qlinear(w: QTensor, bias: Option<Tensor>, native: bool) -> Result<Linear, ModelError> {
    let (out, inp) = w.shape().dims2()?;
    // The block kernel is CPU code; on a GPU candle's own quantized matmul runs instead.
    if native && w.device().is_cpu() {
        if let Some(k) = QWeight::from_qtensor(&w)? {
            return Ok(Linear::new(Weight::Blocks(Arc::new(k)), bias, out, inp));
        }
    }
    Ok(Linear::new(
        Weight::Candle(QMatMul::from_qtensor(w)?),
        bias,
        out,
        inp,
    ))
}

/// Undoes the GGUF converter's q/k permutation: within each head, row `2i + j` of the file is
/// row `j·(hd/2) + i` of the Hugging Face weight. Rows are whole quantization blocks, so the
/// bytes move unchanged.
fn unpermute_rows(w: &QTensor, n_heads: usize, device: &Device) -> Result<QTensor, ModelError> {
    let (rows, cols) = w.shape().dims2()?;
    let dtype = w.dtype();
    if !rows.is_multiple_of(n_heads)
        || !(rows / n_heads).is_multiple_of(2)
        || !cols.is_multiple_of(dtype.block_size())
    {
        return Err(ModelError::InvalidConfig(format!(
            "q/k weight [{rows}, {cols}] does not split into {n_heads} heads"
        )));
    }
    let hd = rows / n_heads;
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = w.data()?;
    if data.len() != rows * row_bytes {
        return Err(ModelError::InvalidConfig(
            "q/k weight has an unexpected byte size".into(),
        ));
    }
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * (hd / 2) + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(ggml_file::qtensor_from_ggml(
        dtype,
        &out,
        vec![rows, cols],
        device,
    )?)
}

/// The safetensors files of a Hugging Face directory: those named by
/// `model.safetensors.index.json` when present, else every `*.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| file_err(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| file_err(&index, e))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(&index, "no weight_map object"))?;
        let mut files = BTreeSet::new();
        for v in map.values() {
            let name = v
                .as_str()
                .ok_or_else(|| file_err(&index, "weight_map values must be file names"))?;
            // A shard name is a plain file name inside the model directory, nothing else.
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(file_err(
                    &index,
                    format!("shard name `{name}` is not a plain file name"),
                ));
            }
            files.insert(dir.join(name));
        }
        return Ok(files.into_iter().collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(file_err(dir, "no *.safetensors files"));
    }
    Ok(files)
}

/// Loads a Hugging Face model directory; weights are converted to f32 on the CPU, f16 on a GPU.
pub fn load_hf_dir(dir: &Path, device: &Device, kernels: Kernels) -> Result<Llama, ModelError> {
    let native = check_kernels(device, kernels)?;
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e))?;
    let cfg = ModelConfig::from_hf_json(&text)?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; like every mmap loader, this assumes
    // nobody truncates them while the process runs.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| file_err(dir, format!("safetensors: {e}")))?;
    // Matrices: f32 for the native kernels; f16 on the portable path (a GPU's tensor cores
    // want it, and it halves the memory), multiplied by candle with f32 activations in and out.
    // Vectors (norms, biases) and the embedding rows stay f32 everywhere: the activations are f32.
    let get_as = |name: &str, dtype: DType| -> Result<Tensor, ModelError> {
        st.load(name, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| file_err(dir, format!("tensor {name}: {e}")))
    };
    let get = |name: &str| get_as(name, DType::F32);
    let matrix_dtype = if native { DType::F32 } else { DType::F16 };
    let dense = |w: Tensor, b: Option<Tensor>| -> Result<Linear, ModelError> {
        let (out, inp) = w.dims2()?;
        let w = if native {
            QMatMul::Tensor(w)
        } else {
            QMatMul::TensorF16(w.to_dtype(DType::F16)?)
        };
        Ok(Linear::new(Weight::Candle(w), b, out, inp))
    };
    let matrix = |name: &str| get_as(name, matrix_dtype);
    let embed = get("model.embed_tokens.weight")?;
    let norm = get("model.norm.weight")?;
    let lm_head = if cfg.tie_word_embeddings {
        dense(embed.clone(), None)?
    } else {
        dense(matrix("lm_head.weight")?, None)?
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let bias = |name: &str| -> Result<Option<Tensor>, ModelError> {
            if cfg.arch.attention_bias() {
                Ok(Some(get(&format!("{p}.self_attn.{name}.bias"))?))
            } else {
                Ok(None)
            }
        };
        let w = |name: &str| matrix(&format!("{p}.{name}.weight"));
        let norm = |name: &str| get(&format!("{p}.{name}.weight"));
        layers.push(Layer {
            input_norm: norm("input_layernorm")?,
            attn: Attention {
                q_proj: dense(w("self_attn.q_proj")?, bias("q_proj")?)?,
                k_proj: dense(w("self_attn.k_proj")?, bias("k_proj")?)?,
                v_proj: dense(w("self_attn.v_proj")?, bias("v_proj")?)?,
                o_proj: dense(w("self_attn.o_proj")?, None)?,
            },
            post_attn_norm: norm("post_attention_layernorm")?,
            mlp: Mlp {
                gate_proj: dense(w("mlp.gate_proj")?, None)?,
                up_proj: dense(w("mlp.up_proj")?, None)?,
                down_proj: dense(w("mlp.down_proj")?, None)?,
            },
        });
    }
    check_shapes(&cfg, &embed, &layers)?;
    let mut model = Llama::new(cfg, embed, layers, norm, lm_head, device)?;
    if !native {
        model.use_portable_kernels();
    }
    Ok(model)
}

/// Every matrix must have the shape the config implies; a mismatch would otherwise surface as
/// a matmul error in the middle of the first request.
fn check_shapes(cfg: &ModelConfig, embed: &Tensor, layers: &[Layer]) -> Result<(), ModelError> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let expect = |what: String, got: (usize, usize), want: (usize, usize)| {
        if got == want {
            Ok(())
        } else {
            Err(ModelError::InvalidConfig(format!(
                "{what} has shape {got:?}, the config implies {want:?}"
            )))
        }
    };
    expect("embeddings".into(), embed.dims2()?, (cfg.vocab_size, h))?;
    for (i, l) in layers.iter().enumerate() {
        let dims = |lin: &Linear| (lin.out_features(), lin.in_features());
        expect(
            format!("layer {i} q_proj"),
            dims(&l.attn.q_proj),
            (cfg.num_heads * hd, h),
        )?;
        expect(
            format!("layer {i} k_proj"),
            dims(&l.attn.k_proj),
            (cfg.num_kv_heads * hd, h),
        )?;
        expect(
            format!("layer {i} v_proj"),
            dims(&l.attn.v_proj),
            (cfg.num_kv_heads * hd, h),
        )?;
        expect(
            format!("layer {i} o_proj"),
            dims(&l.attn.o_proj),
            (h, cfg.num_heads * hd),
        )?;
        let ffn = cfg.intermediate_size;
        expect(
            format!("layer {i} gate_proj"),
            dims(&l.mlp.gate_proj),
            (ffn, h),
        )?;
        expect(format!("layer {i} up_proj"), dims(&l.mlp.up_proj), (ffn, h))?;
        expect(
            format!("layer {i} down_proj"),
            dims(&l.mlp.down_proj),
            (h, ffn),
        )?;
    }
    Ok(())
}
