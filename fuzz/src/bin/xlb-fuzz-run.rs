//! Runs fuzz inputs through a target without a fuzzer, to reproduce and debug a failure:
//! `xlb-fuzz-run TARGET FILE|DIR...`. Exits non-zero on the first broken invariant (its panic
//! message and backtrace show which).

use std::path::Path;

fn run_path(target: fn(&[u8]), path: &Path, count: &mut usize) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.path());
        for e in entries {
            run_path(target, &e.path(), count)?;
        }
        return Ok(());
    }
    let data = std::fs::read(path)?;
    eprintln!("{} ({} bytes)", path.display(), data.len());
    target(&data);
    *count += 1;
    Ok(())
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_default();
    let Some(&(_, target)) = xlb_fuzz::targets::ALL.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = xlb_fuzz::targets::ALL.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "usage: xlb-fuzz-run TARGET FILE|DIR...  (targets: {})",
            names.join(", ")
        );
        std::process::exit(2);
    };
    let mut count = 0;
    for p in args {
        run_path(target, Path::new(&p), &mut count)?;
    }
    println!("{name}: {count} inputs, no invariant broken");
    Ok(())
}
