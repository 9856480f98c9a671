//! Release builds of `outpost` for x86_64 Linux fold identical functions at
//! link time (lld's `--icf=all`): tract instantiates much of its code once
//! per tensor type, and many of those copies compile to the same bytes. That
//! keeps the stripped binary under 15 MB (figures in README.md, "Footprint").
//! Rust does not promise distinct addresses for distinct functions, so
//! folding them is sound.
//!
//! Only where rustc's own lld links (x86_64-unknown-linux-gnu, with no other
//! linker configured); `OUTPOST_NO_ICF=1` turns it off.

fn main() {
    println!("cargo:rerun-if-env-changed=OUTPOST_NO_ICF");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let other_linker = std::env::var_os("RUSTC_LINKER").is_some()
        || var("CARGO_ENCODED_RUSTFLAGS").contains("linker")
        || var("CARGO_ENCODED_RUSTFLAGS").contains("link-self-contained");
    if var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("PROFILE") == "release"
        && !other_linker
        && var("OUTPOST_NO_ICF") != "1"
    {
        println!("cargo:rustc-link-arg-bin=outpost=-Wl,--icf=all");
    }
}
