//! `hangar validate` and start-up refusals.

use std::process::Command;

use hangar_tests::*;

#[test]
fn validate_exit_codes_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "mcp_servers:\n  a:\n    command: [npx, x]\n").unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "mcp_servers:\n  math:\n    commandd: [x]\n  r:\n    mode: remote\n",
    )
    .unwrap();
    let out = Command::new(bin("hangar"))
        .arg("validate")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = Command::new(bin("hangar"))
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mcp_servers.math.commandd: unknown key; did you mean `command`?"),
        "{err}"
    );
    assert!(err.contains("mcp_servers.r.endpoint: is required"), "{err}");
    let out = Command::new(bin("hangar"))
        .arg("validate")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_refuses_an_unset_variable_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "mcp_servers:\n  r:\n    mode: remote\n    endpoint: \"${HANGAR_TEST_UNSET_ENDPOINT}\"\n",
    )
    .unwrap();
    let out = Command::new(bin("hangar"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .env_remove("HANGAR_TEST_UNSET_ENDPOINT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HANGAR_TEST_UNSET_ENDPOINT") && err.contains("mcp_servers.r.endpoint"),
        "{err}"
    );
}
