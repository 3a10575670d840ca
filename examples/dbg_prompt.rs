use adapterd::engine::tokenizer::ChatMessage;
fn main() -> anyhow::Result<()> {
    let path = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let loaded = adapterd::engine::load_model(&path, &candle_core::Device::Cpu)?;
    let msgs = vec![ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let text = loaded.tokenizer.apply_chat_template(&msgs, true)?;
    println!("{text:?}");
    let ids = loaded.tokenizer.encode(&text, false)?;
    println!("{ids:?}");
    let mut cache = adapterd::engine::model::SeqCache::new(loaded.model.cfg.num_layers);
    let mut input = ids.clone();
    let mut out = vec![];
    for _ in 0..20 {
        let l = loaded
            .model
            .forward(&mut [adapterd::engine::model::SeqInput {
                tokens: &input,
                cache: &mut cache,
                all_logits: false,
            }])?
            .to_vec2::<f32>()?
            .remove(0);
        let best = l
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a })
            .0 as u32;
        out.push(best);
        input = vec![best];
    }
    println!("{:?}", loaded.tokenizer.decode(&out, false)?);
    println!("{:?}", loaded.model.cfg);
    Ok(())
}
