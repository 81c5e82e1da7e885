//! Writes the seed corpus: `xlb-fuzz-seeds [DIR]` (default `fuzz/corpus`), one directory per
//! target. Existing files of the same name are overwritten; others are left alone.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".to_string()),
    );
    for (name, _) in xlb_fuzz::targets::ALL {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        let seeds = xlb_fuzz::seeds::seeds(name);
        for (file, bytes) in &seeds {
            std::fs::write(d.join(file), bytes)?;
        }
        println!("{name}: {} seeds in {}", seeds.len(), d.display());
    }
    Ok(())
}
