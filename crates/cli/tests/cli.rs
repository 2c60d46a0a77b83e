//! The `boomerang` binary end to end, checked with real tools (qemu-img) and a real Azure Blob
//! emulator (Azurite, started by `scripts/test`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use boomerang_core::sample::XorShift as Rng;
use boomerang_testkit::{azurite, have, unique};
use serde_json::Value;

fn boomerang(args: &[&str]) -> Output {
    boomerang_env(args, &[])
}

fn boomerang_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_boomerang"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the boomerang binary runs")
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = boomerang(args);
    assert!(
        out.status.success(),
        "boomerang {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    serde_json::from_str(&ok(&all)).unwrap()
}

/// Writes `count` random 4 KiB-ish patches into the image.
fn scribble(image: &Path, rng: &mut Rng, count: usize) {
    let mut data = std::fs::read(image).unwrap();
    for _ in 0..count {
        let off = (rng.next_u64() % (data.len() as u64 - 5000)) as usize;
        for b in &mut data[off..off + 5000] {
            *b = rng.next_u64() as u8;
        }
    }
    std::fs::write(image, data).unwrap();
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Several points of a changing image: every raw export equals the image at that point, and
/// qcow2, vmdk and vhd exports hold the same data according to qemu-img.
fn round_trip(store: &str, dir: &Path) {
    ok(&["store", "init", store, "--block-size", "64KiB"]);
    let image = dir.join("disk.img");
    // 20 MiB + 12 KiB: the tail block is short.
    let mut data = vec![0u8; 20 * 1024 * 1024 + 12 * 1024];
    let mut rng = Rng::new(42);
    for b in &mut data[..6 * 1024 * 1024] {
        *b = rng.next_u64() as u8;
    }
    std::fs::write(&image, &data).unwrap();
    let mut copies: Vec<PathBuf> = Vec::new();
    for n in 1..=4 {
        if n > 1 {
            scribble(&image, &mut rng, 30);
        }
        let r = json(&[
            "store",
            "commit",
            store,
            "--disk",
            "sda",
            "--image",
            image.to_str().unwrap(),
        ]);
        assert_eq!(r["point"], n);
        let copy = dir.join(format!("copy-{n}.img"));
        std::fs::copy(&image, &copy).unwrap();
        copies.push(copy);
    }
    let points = json(&["store", "points", store, "--disk", "sda"]);
    assert_eq!(points.as_array().unwrap().len(), 4);

    for (i, copy) in copies.iter().enumerate() {
        let out = dir.join(format!("export-{}.raw", i + 1));
        let point = (i + 1).to_string();
        ok(&[
            "store",
            "export",
            store,
            "--disk",
            "sda",
            "--point",
            &point,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(copy).unwrap(),
            "raw export of point {point} differs from the image at that point"
        );
    }
    let raw = dir.join("export-2.raw");
    for (format, qemu_format) in [("qcow2", "qcow2"), ("vmdk", "vmdk"), ("vhd", "vpc")] {
        let out = dir.join(format!("export-2.{format}"));
        ok(&[
            "store",
            "export",
            store,
            "--disk",
            "sda",
            "--point",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--format",
            format,
        ]);
        if format == "qcow2" {
            qemu_img(&["check", out.to_str().unwrap()]);
        }
        qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            qemu_format,
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
    }

    // Diff between points names the changed ranges.
    let diff = json(&["store", "diff", store, "--disk", "sda", "1", "latest"]);
    assert!(diff["changed_bytes"].as_u64().unwrap() > 0);
    assert!(!diff["ranges"].as_array().unwrap().is_empty());

    // Prune and GC keep the newest points readable.
    let pruned = json(&["store", "prune", store, "--keep", "2"]);
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 2);
    let gc = json(&["store", "gc", store]);
    assert!(gc["deleted_objects"].as_u64().unwrap() > 0);
    let out = dir.join("after-gc.raw");
    ok(&[
        "store",
        "export",
        store,
        "--disk",
        "sda",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&copies[3]).unwrap());
    let verify = json(&["store", "verify", store]);
    assert!(verify["bad"].as_array().unwrap().is_empty(), "{verify}");
}

#[test]
fn round_trip_on_a_local_store() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    round_trip(store.to_str().unwrap(), dir.path());
    // Sparse raw export: the zero tail of the disk is a hole.
    let meta = std::fs::metadata(dir.path().join("after-gc.raw")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < meta.len(),
        "raw exports must be sparse"
    );
}

#[test]
fn round_trip_on_azure_blob() {
    if !have("qemu-img") || !azurite() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("azure://{}/site-b", unique("cli"));
    round_trip(&store, dir.path());
}

#[test]
fn a_flipped_byte_in_a_chunk_is_named_by_verify_and_stops_export() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    ok(&["store", "init", store, "--block-size", "4KiB"]);
    let image = dir.path().join("disk.img");
    let mut rng = Rng::new(5);
    let data: Vec<u8> = (0..1024 * 1024).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&image, &data).unwrap();
    ok(&[
        "store",
        "commit",
        store,
        "--disk",
        "db",
        "--image",
        image.to_str().unwrap(),
    ]);

    // The chunk of the block at offset 40960.
    let block = &data[40960..40960 + 4096];
    let hex = blake3::hash(block).to_hex().to_string();
    let chunk = Path::new(store).join("chunks").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&chunk, bytes).unwrap();

    let out = boomerang(&["store", "verify", store]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "verify must fail on a damaged chunk"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("disk db, point 1, offset 40960"),
        "{stderr}"
    );
    assert!(stderr.contains(&hex), "{stderr}");

    let target = dir.path().join("out.img");
    let out = boomerang(&[
        "store",
        "export",
        store,
        "--disk",
        "db",
        "--out",
        target.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "export of a damaged point must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("disk db, point 1, offset 40960"),
        "{stderr}"
    );
    assert!(
        !target.exists(),
        "a failed export must not leave its output behind"
    );
}

#[test]
fn bad_input_is_refused_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let out = boomerang(&["store", "init", store, "--block-size", "3000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));

    let out = boomerang(&["store", "points", "/nonexistent/store"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("boomerang store init /nonexistent/store")
    );

    // JSON errors are JSON.
    let out = boomerang(&["store", "points", "/nonexistent/store", "--output", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("no Boomerang store"));

    ok(&["store", "init", store]);
    let out = boomerang(&["store", "init", store]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = boomerang(&[
        "store", "export", store, "--disk", "nope", "--out", "/tmp/x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no points"));
    let out = boomerang(&["store", "prune", store, "--keep", "forever"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a retention"));
}

#[test]
fn azure_credentials_and_reachability_errors() {
    // Nothing listens on port 9: retried, then a clear error.
    let store = format!("azure://{}", unique("unreachable"));
    let out = boomerang_env(
        &["store", "init", &store],
        &[
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", "http://127.0.0.1:9"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not reach"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    if !azurite() {
        return;
    }
    let wrong = [(
        "AZURE_STORAGE_ACCOUNT_KEY",
        "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==",
    )];
    let store = format!("azure://{}", unique("badkey"));
    let out = boomerang_env(&["store", "init", &store], &wrong);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("AZURE_STORAGE_ACCOUNT_KEY"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A store made with the right key, read with a wrong one.
    ok(&["store", "init", &store]);
    let out = boomerang_env(&["store", "points", &store], &wrong);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("credentials"), "{stderr}");
}

#[test]
fn quickstart_runs_the_whole_circle_and_verifies_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let v = json(&[
        "quickstart",
        "--dir",
        dir.path().join("tour").to_str().unwrap(),
        "--disk-size",
        "8MiB",
        "--workload-seconds",
        "1",
    ]);
    assert_eq!(v["ok"], true, "{v}");
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 10, "{v}");
    assert!(
        steps
            .iter()
            .all(|s| s["ok"] == true && s["seconds"].is_f64()),
        "{v}"
    );
    assert_eq!(v["disk_size_bytes"], 8 << 20);
    for key in [
        "rpo_seconds",
        "failover_rto_seconds",
        "failback_rto_seconds",
    ] {
        assert!(v[key].as_f64().is_some_and(|s| s > 0.0), "{key}: {v}");
    }
    // Each reprotect moved what changed (scattered 4 KiB blocks), not the disk: at most 1.1x
    // the changed bytes plus 0.1% of the disk.
    for (moved, changed) in [
        ("reprotect_bytes_moved", "reprotect_bytes_changed"),
        (
            "reprotect_again_bytes_moved",
            "reprotect_again_bytes_changed",
        ),
    ] {
        let (m, c) = (v[moved].as_u64().unwrap(), v[changed].as_u64().unwrap());
        assert!(
            (c..=c * 11 / 10 + (8 << 20) / 1000).contains(&m),
            "{moved} {m} for {c} changed: {v}"
        );
    }
    // A used directory is refused before anything starts.
    let out = boomerang(&[
        "quickstart",
        "--dir",
        dir.path().join("tour").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
}

#[test]
fn pki_creates_a_ca_once_and_issues_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_str = ca.to_str().unwrap();
    let init = json(&["pki", "init", ca_str]);
    assert_eq!(init["ca_cert"], ca.join("ca.crt").to_str().unwrap());
    let again = boomerang(&["pki", "init", ca_str]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a CA"));

    let issued = json(&[
        "pki",
        "issue",
        ca_str,
        "--name",
        "ps1",
        "--role",
        "process-server",
        "--host",
        "127.0.0.1",
    ]);
    assert_eq!(issued["identity"], "ps1.process-server.boomerang.internal");
    assert!(ca.join("issued/ps1/cert.pem").is_file());
    for (args, says) in [
        (
            vec!["--name", "Bad_Name", "--role", "agent"],
            "not a valid component name",
        ),
        (vec!["--name", "web01", "--role", "robot"], "not a role"),
    ] {
        let mut all = vec!["pki", "issue", ca_str];
        all.extend(args);
        let out = boomerang(&all);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    let nowhere = dir.path().join("none");
    let out = boomerang(&[
        "pki",
        "issue",
        nowhere.to_str().unwrap(),
        "--name",
        "web01",
        "--role",
        "agent",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("boomerang pki init"));
}

#[test]
fn a_sealed_store_is_made_with_its_key_file_and_read_only_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let key = dir.path().join("site-b.key");
    let key = key.to_str().unwrap();
    let made = ok(&[
        "store",
        "init",
        store,
        "--block-size",
        "4KiB",
        "--sealed",
        "--key-file",
        key,
    ]);
    assert!(made.contains("back that file up"), "{made}");
    let image = dir.path().join("disk.img");
    let mut rng = Rng::new(9);
    let data: Vec<u8> = (0..256 * 1024).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&image, &data).unwrap();
    // Without the key, the store says what it needs.
    let out = boomerang(&["store", "points", store]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sealed") && stderr.contains("--key-file"),
        "{stderr}"
    );
    // With it (here from the environment), the round trip is exact.
    let with_key = |args: &[&str]| {
        let out = boomerang_env(args, &[("BOOMERANG_STORE_KEY_FILE", key)]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    with_key(&[
        "store",
        "commit",
        store,
        "--disk",
        "db",
        "--image",
        image.to_str().unwrap(),
    ]);
    let target = dir.path().join("out.img");
    with_key(&[
        "store",
        "export",
        store,
        "--disk",
        "db",
        "--out",
        target.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&target).unwrap() == data);
    with_key(&["store", "verify", store]);
    // Another key is not this store's, and an existing key file is never overwritten.
    let other = dir.path().join("other.key");
    let other = other.to_str().unwrap();
    ok(&[
        "store",
        "init",
        &format!("{store}-2"),
        "--sealed",
        "--key-file",
        other,
    ]);
    let out = boomerang(&["store", "verify", store, "--key-file", other]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the key of the store"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(key).unwrap().trim().len(), 64);
}

#[test]
fn quickstart_with_site_b_on_azure_blob_runs_the_whole_circle() {
    if !azurite() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tour = dir.path().join("tour");
    let location = format!("azure://{}/dr", unique("quickstart"));
    let v = json(&[
        "quickstart",
        "--dir",
        tour.to_str().unwrap(),
        "--disk-size",
        "8MiB",
        "--workload-seconds",
        "1",
        "--azure",
        &location,
    ]);
    assert_eq!(v["ok"], true, "{v}");
    let root = v["site_b_store"].as_str().unwrap();
    assert!(root.starts_with(&location), "{v}");
    // Site B's points are on Azure Blob, sealed: its store (of the replica's lineage; its
    // first checkpoint may not be in yet when the quickstart stops) opens with the key the run
    // made, and only with it.
    assert!(!tour.join("site-b/retention/replicas/web01/store").exists());
    let key = tour.join("site-b.key");
    let lineage =
        std::fs::read_to_string(tour.join("site-b/retention/replicas/web01/lineage")).unwrap();
    let store = format!("{root}/web01/lineage-{}", lineage.trim());
    let points = json(&[
        "store",
        "points",
        &store,
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(points.is_array(), "{points}");
    let without = boomerang(&["store", "points", &store]);
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("sealed"));
}
