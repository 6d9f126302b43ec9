use std::process::ExitCode;

// Batch jobs allocate and free large column buffers from several threads;
// mimalloc reuses them without the page faults glibc's arenas cost. Built
// without transparent huge pages (`no_thp`): the kernel zeroed a 2 MB page
// for every short-lived column buffer (13% of a bill run's CPU at 1M meters).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    meterflow::cli::main()
}
