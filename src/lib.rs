//! engram: locate, edit and unlearn facts in transformer language models, and prove with a
//! report that nothing unrelated moved.
//!
//! The library knows nothing of the command line; `src/main.rs` and `src/cli/` are a thin
//! layer over it. Start with [`model::load`], [`model::Model::forward`] and
//! [`model::Trace`].

pub mod bench;
pub mod data;
pub mod edit;
pub mod error;
pub mod eval;
pub mod fact;
pub mod limits;
pub mod linalg;
pub mod locate;
pub mod model;
pub mod output;
pub mod stats;
pub mod unlearn;

pub use error::{Error, Result};

/// Tune glibc's allocator for tensor work; call once at start-up (the `engram` binary and the
/// examples do). Tensors of megabytes are allocated and freed at every op; by default glibc
/// serves each one from fresh mmapped pages and unmaps it on free, so every op page-faults
/// and zeroes its output again. `perf` put the kernel's page-fault work at a tenth of an
/// exact causal trace; with the mmap threshold at its 32 MB maximum and no trimming, the
/// Eiffel trace went from 83-88 s to 60-64 s on 2 cores (peak RSS 1.23 GB either way).
/// A no-op on other C libraries (mimalloc, tried instead, gave 76-83 s).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Hand the heap's free memory back to the system (glibc `malloc_trim`). [`tune_allocator`]
/// turns automatic trimming off, which is right inside a phase (a trace or a search frees
/// and re-allocates the same sizes thousands of times) but keeps a finished phase's peak
/// resident; call this between phases (after a v* search, before loading another model).
/// A no-op on other C libraries.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident memory of this process in MB (Linux; 0 elsewhere), for debug logs.
pub fn rss_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

/// Peak resident memory of this process so far in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

fn proc_status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
