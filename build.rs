//! Build script: sets the shared library's soname and generates
//! `include/tcpframe.h` from the FFI layer with cbindgen.
//!
//! With `TCPFRAME_VERIFY_HEADER=1` it does not write the header: it fails the
//! build when the committed header differs from a fresh generation.

use std::env;
use std::fs;
use std::path::PathBuf;

/// Programs linked with -ltcpframe look for the soname (libtcpframe.so.0)
/// at run time: put a link to libtcpframe.so next to it in the profile
/// directory, so that `cargo build --release` alone is enough to run them.
/// (The link may dangle until the library is linked, a moment later.)
fn soname_link() {
    let Ok(out) = env::var("OUT_DIR") else { return };
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let Some(profile_dir) = PathBuf::from(out).ancestors().nth(3).map(PathBuf::from) else { return };
    let link = profile_dir.join("libtcpframe.so.0");
    if fs::symlink_metadata(&link).is_err() {
        #[cfg(unix)]
        let _ = std::os::unix::fs::symlink("libtcpframe.so", &link);
    }
}

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=TCPFRAME_VERIFY_HEADER");

    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtcpframe.so.0");
        soname_link();
    }

    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable and valid");
    let bindings = cbindgen::Builder::new()
        // Only the FFI layer: internal items never leak into the header.
        .with_src(crate_dir.join("src").join("ffi").join("mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);

    let header = crate_dir.join("include").join("tcpframe.h");
    let committed = fs::read(&header).unwrap_or_default();
    if committed == fresh {
        return;
    }
    if env::var("TCPFRAME_VERIFY_HEADER").as_deref() == Ok("1") {
        panic!(
            "include/tcpframe.h is stale: it differs from what cbindgen generates from src/. \
             Run `cargo build` without TCPFRAME_VERIFY_HEADER and commit the header."
        );
    }
    fs::create_dir_all(header.parent().unwrap()).expect("create include/");
    fs::write(&header, fresh).expect("write include/tcpframe.h");
}
