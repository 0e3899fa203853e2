//! Generates the C header `vshm.h` from this crate's sources with cbindgen (cbindgen.toml)
//! into `OUT_DIR`; the test `header_is_current` compares it with the committed
//! `include/vshm.h`. With `VSHM_UPDATE_HEADER=1` the committed copy is rewritten too.

use std::path::{Path, PathBuf};

/// The crate's sources: cbindgen reads `src/lib.rs` and follows its modules; a change to
/// any of them regenerates the header.
const SOURCES: &[&str] = &[
    "src/lib.rs",
    "src/transport.rs",
    "src/namespace.rs",
    "src/section.rs",
    "src/sync.rs",
];

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=VSHM_UPDATE_HEADER");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("guest/capi/cbindgen.toml: {e}"));
    for src in SOURCES {
        println!("cargo:rerun-if-changed={src}");
    }
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen could not generate vshm.h: {e}"));
    let mut text = Vec::new();
    bindings.write(&mut text);
    let text = String::from_utf8(text).expect("cbindgen writes UTF-8");
    let generated = out.join("vshm.h");
    std::fs::write(&generated, hex_statuses(&text))
        .unwrap_or_else(|e| panic!("{}: {e}", generated.display()));
    if std::env::var_os("VSHM_UPDATE_HEADER").is_some_and(|v| v == "1") {
        let committed = dir.join("include").join("vshm.h");
        copy(&generated, &committed);
        println!(
            "cargo:warning=rewrote {} (VSHM_UPDATE_HEADER=1)",
            committed.display()
        );
    }
}

/// cbindgen writes integer constants in decimal; NTSTATUS values are read (and grepped
/// for) in hex: `#define VSHM_STATUS_INVALID_HANDLE 0xC0000008u`.
fn hex_statuses(header: &str) -> String {
    let mut out = String::with_capacity(header.len());
    for line in header.lines() {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#define"), Some(name), Some(value), None)
                if name.starts_with("VSHM_STATUS_") =>
            {
                let value: u32 = value
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}: not a u32 ({value}): {e}"));
                out.push_str(&format!("#define {name} 0x{value:08X}u"));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn copy(from: &Path, to: &Path) {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
    }
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
}
