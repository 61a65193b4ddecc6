fn main() -> std::process::ExitCode {
    edgesync::cli::main()
}
