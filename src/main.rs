use std::process::ExitCode;

fn main() -> ExitCode {
    meterflow::cli::main()
}
