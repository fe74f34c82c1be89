//! `hangar-chaos run --nodes 3 --faults kill,pause,partition --duration 60s --seed N`

fn main() -> anyhow::Result<()> {
    anyhow::bail!("hangar-chaos: the run command is being assembled")
}
