//! Training checkpoints: the LoRA variables and AdamW moments of a job, with the step they
//! belong to, in one safetensors file written to a temporary name, fsynced and renamed into
//! place — a crash leaves the previous checkpoint or the new one, never half of either.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// What a checkpoint holds, by variable name (see `TrainableLora::named_vars`).
pub struct Checkpoint {
    pub step: usize,
    pub adam_t: usize,
    /// The resolved hyperparameters as JSON, so a resume can refuse a mismatched job.
    pub hyper: String,
    pub vars: HashMap<String, Tensor>,
    pub adam_m: HashMap<String, Tensor>,
    pub adam_v: HashMap<String, Tensor>,
}

fn f32_bytes(t: &Tensor) -> candle_core::Result<(Vec<usize>, Vec<u8>)> {
    let dims = t.dims().to_vec();
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok((dims, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
}

impl Checkpoint {
    /// Writes atomically to `path` (via `path` + ".tmp").
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (prefix, map) in [
            ("var", &self.vars),
            ("adam_m", &self.adam_m),
            ("adam_v", &self.adam_v),
        ] {
            for (name, t) in map {
                let (dims, bytes) = f32_bytes(t)?;
                buffers.push((format!("{prefix}.{name}"), dims, bytes));
            }
        }
        let views = buffers
            .iter()
            .map(|(n, d, b)| Ok((n.clone(), TensorView::new(Dtype::F32, d.clone(), b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let meta = HashMap::from([
            ("step".to_owned(), self.step.to_string()),
            ("adam_t".to_owned(), self.adam_t.to_string()),
            ("hyper".to_owned(), self.hyper.clone()),
        ]);
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, Some(meta), &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)?;
        let st = SafeTensors::deserialize(&bytes)?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)?;
        let meta = meta
            .metadata()
            .clone()
            .ok_or_else(|| anyhow::anyhow!("checkpoint has no metadata"))?;
        let num = |k: &str| -> anyhow::Result<usize> {
            meta.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("checkpoint metadata lacks `{k}`"))
        };
        let mut ck = Checkpoint {
            step: num("step")?,
            adam_t: num("adam_t")?,
            hyper: meta.get("hyper").cloned().unwrap_or_default(),
            vars: HashMap::new(),
            adam_m: HashMap::new(),
            adam_v: HashMap::new(),
        };
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                anyhow::bail!("checkpoint tensor {name} is not f32");
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let t = Tensor::from_vec(data, view.shape(), &Device::Cpu)?;
            let (prefix, rest) = name
                .split_once('.')
                .ok_or_else(|| anyhow::anyhow!("unexpected checkpoint tensor {name}"))?;
            let map = match prefix {
                "var" => &mut ck.vars,
                "adam_m" => &mut ck.adam_m,
                "adam_v" => &mut ck.adam_v,
                _ => anyhow::bail!("unexpected checkpoint tensor {name}"),
            };
            map.insert(rest.to_owned(), t);
        }
        Ok(ck)
    }
}
