//! Compiles `proto/**/*.proto` with protox (pure Rust, no `protoc` binary) and generates
//! tonic/prost code into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["hangar/raft/v1/raft.proto", "hangar/node/v1/call.proto"];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
