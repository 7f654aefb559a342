// Test binaries link libtorch through denoised-server: same rpath and --no-as-needed rules.
include!("../server/build.rs");
