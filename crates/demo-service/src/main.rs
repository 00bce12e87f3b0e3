//! `demo-service`: see the crate docs of `orch_demo_service` for the commands and the handover
//! protocol.

fn main() -> std::process::ExitCode {
    orch_demo_service::cli::main()
}
