//! The `engram` command. `main` only maps `cli::run() -> Result<ExitCode>` to an exit code:
//! 0 success, 1 internal failure, 2 bad input (spec, flags, files).

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    engram::tune_allocator();
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let bad_input = e
                .chain()
                .find_map(|c| c.downcast_ref::<engram::Error>())
                .map(|e| e.is_bad_input())
                .unwrap_or(false);
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}
