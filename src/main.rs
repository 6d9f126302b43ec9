use std::process::ExitCode;

// Batch jobs allocate and free large column buffers from several threads;
// mimalloc reuses them without the page faults glibc's arenas cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    meterflow::cli::main()
}
