//! The `main` every benchmark tool of this crate shares: parse, run, and the exit codes the
//! scripts rely on (2 with the usage for a bad command line, 1 for a failed run).

use std::process::ExitCode;

/// Runs a tool: `parse` the command line (an empty error asks for the usage alone, as
/// `--help` does), then `run`; errors are printed as `NAME: error`.
pub fn tool_main<A>(
    name: &str,
    usage: &str,
    parse: impl FnOnce() -> Result<A, String>,
    run: impl FnOnce(A) -> Result<(), String>,
) -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{name}: {e}");
            }
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
