//! Compiles `ult/v1/*.proto` with protox (pure Rust), so building ult needs no `protoc` install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ult/v1/ult.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let file_descriptors = protox::compile(protos, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("ult_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::UltCodec")
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_fds(file_descriptors)?;
    Ok(())
}
