// Link libtorch so that the binary runs without LD_LIBRARY_PATH and really loads libtorch_cuda.
//
// torch-sys tells direct dependents where libtorch lives (`DEP_TCH_LIBTORCH_LIB`, from its
// `links = "tch"`). We embed that directory as an rpath, and force `libtorch.so` (which pulls
// `libtorch_cuda.so` on CUDA wheels) into NEEDED: with the default `--as-needed` the linker drops
// it because no symbol is referenced directly, and `tch::Cuda::is_available()` then reports false.
fn main() {
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-changed=build.rs");
}
