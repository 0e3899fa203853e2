//! Link flags of the freestanding binary: static, not position-independent, no C runtime,
//! laid out by link.ld (.text at 0x100000, `_start` first). Set here rather than in
//! .cargo/config.toml so they apply however cargo is invoked (`--manifest-path` from
//! another directory reads no config of this directory).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostdlib",
        "-nostartfiles",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-n",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
}
