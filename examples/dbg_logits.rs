fn main() -> anyhow::Result<()> {
    let path = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let loaded = adapterd::engine::load_model(&path, &candle_core::Device::Cpu)?;
    let full: Vec<u32> = std::env::args()
        .nth(2)
        .unwrap()
        .split(",")
        .map(|s| s.parse().unwrap())
        .collect();
    for ids in [full.clone(), full[..8].to_vec(), full[..16].to_vec()] {
        let mut cache = adapterd::engine::model::SeqCache::new(loaded.model.cfg.num_layers);
        let l = loaded
            .model
            .forward(&mut [adapterd::engine::model::SeqInput {
                tokens: &ids,
                cache: &mut cache,
                all_logits: false,
            }])?
            .to_vec2::<f32>()?
            .remove(0);
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|a, b| l[*b].total_cmp(&l[*a]));
        println!(
            "{} {:?}",
            ids.len(),
            idx[..5].iter().map(|&i| (i, l[i])).collect::<Vec<_>>()
        );
    }
    Ok(())
}
