//! TEMPORARY stub (replaced by the real module being written in parallel).
#[derive(clap::Args, Debug)]
pub struct ChinchillaArgs {
    #[arg(long)]
    pub flops: f64,
}
pub fn run_cli(_args: &ChinchillaArgs) -> anyhow::Result<String> {
    anyhow::bail!("not yet")
}
