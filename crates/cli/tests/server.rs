//! The configuration server as a user meets it: `boomerang server init`, then `boomerang
//! server` serving HTTPS on loopback, talked to with curl and the CA certificate that init
//! wrote; bearer tokens with roles, every denial audited, JSON errors naming what is wrong.

use std::path::Path;
use std::process::Command;

use boomerang_testkit::{Daemon, have, run};
use serde_json::{Value, json};

fn boomerang(args: &[&str]) -> String {
    run(env!("CARGO_BIN_EXE_boomerang"), args)
}

/// A server initialised in `dir` and running on a free loopback port; its admin token.
fn server(dir: &Path) -> (Daemon, String) {
    server_with(dir, |_| {})
}

/// As [`server`], with `edit` run on the state directory before the server starts.
fn server_with(dir: &Path, edit: impl FnOnce(&Path)) -> (Daemon, String) {
    let state = dir.join("state");
    let init: Value = serde_json::from_str(&boomerang(&[
        "server",
        "init",
        state.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    let token = init["admin_token"].as_str().unwrap().to_string();
    edit(&state);
    let config = state.join("server.toml");
    let daemon = Daemon::start(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "server",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    (daemon, token)
}

/// Gives the server in `state` the inventory file `inventory`, and makes the other `edits` to
/// its server.toml (each line init wrote, and its replacement).
fn with_inventory(state: &Path, inventory: &str, edits: &[(&str, &str)]) {
    std::fs::write(state.join("inventory.toml"), inventory).unwrap();
    let config = state.join("server.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    for (line, new) in [("inventory = []", "inventory = [\"inventory.toml\"]")]
        .iter()
        .chain(edits)
    {
        assert!(text.contains(line), "{line} in {text}");
        text = text.replace(line, new);
    }
    std::fs::write(&config, text).unwrap();
}

/// One request with curl: the status and the JSON body (Null when empty).
fn call(
    dir: &Path,
    url_host: &str,
    port: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg("--cacert")
        .arg(dir.join("state/ca.crt"))
        .arg(format!("https://{url_host}:{port}{path}"));
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
    }
    let out = cmd.output().expect("run curl");
    assert!(
        out.status.success(),
        "curl failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
    };
    (status.parse().unwrap(), json)
}

#[test]
fn roles_tokens_audit_and_errors_over_https() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (daemon, admin) = server(dir.path());
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let d = dir.path();
    // The certificate is good for localhost and 127.0.0.1 under the CA init wrote.
    for host in ["localhost", "127.0.0.1"] {
        let (status, body) = call(d, host, &port, "GET", "/api/health", Some(&admin), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "ok");
    }
    let get =
        |path: &str, token: Option<&str>| call(d, "127.0.0.1", &port, "GET", path, token, None);
    let post = |path: &str, token: Option<&str>, body: Value| {
        call(d, "127.0.0.1", &port, "POST", path, token, Some(&body))
    };

    // Tokens for each role, made by the admin.
    let mut tokens = vec![("admin", admin.clone())];
    for role in ["viewer", "operator"] {
        let (status, made) = post(
            "/api/tokens",
            Some(&admin),
            json!({"name": format!("{role}1"), "role": role}),
        );
        assert_eq!(status, 201, "{made}");
        assert_eq!(made["role"], role);
        tokens.push((role, made["token"].as_str().unwrap().to_string()));
    }

    // The matrix: each role against each kind of endpoint.
    let kinds: [(&str, &str, Option<Value>, [u16; 3]); 7] = [
        ("GET", "/api/health", None, [200, 200, 200]),
        ("GET", "/api/status", None, [200, 200, 200]),
        // Configuration: an admin's (no such machine here).
        (
            "PUT",
            "/api/machines/nope/policy",
            Some(json!({"policy": "gold"})),
            [403, 403, 404],
        ),
        ("GET", "/api/openapi.json", None, [200, 200, 200]),
        ("GET", "/api/tokens", None, [403, 403, 200]),
        ("GET", "/api/audit", None, [403, 403, 200]),
        // A job: an operator's (this body lacks its kind).
        ("POST", "/api/jobs", Some(json!({})), [403, 400, 400]),
    ];
    for (method, path, body, want) in &kinds {
        let (status, _) = call(d, "127.0.0.1", &port, method, path, None, body.as_ref());
        assert_eq!(status, 401, "{method} {path} without a token");
        let (status, err) = call(
            d,
            "127.0.0.1",
            &port,
            method,
            path,
            Some("bmr_not_a_token"),
            body.as_ref(),
        );
        assert_eq!((status, err["code"].as_str()), (401, Some("UNAUTHORIZED")));
        // `want` is by role, viewer first; `tokens` has the admin first.
        for ((role, token), want) in tokens.iter().zip([want[2], want[0], want[1]]) {
            let (status, body) = call(
                d,
                "127.0.0.1",
                &port,
                method,
                path,
                Some(token),
                body.as_ref(),
            );
            assert_eq!(status, want, "{role}: {method} {path}: {body}");
            if status == 403 {
                assert_eq!(body["code"], "FORBIDDEN");
                assert!(body["message"].as_str().unwrap().contains("role"), "{body}");
            }
        }
    }
    let viewer = &tokens[1].1;
    let (status, _) = post(
        "/api/tokens",
        Some(viewer),
        json!({"name": "x", "role": "admin"}),
    );
    assert_eq!(status, 403, "a viewer makes no tokens");
    // A denied request with a large body still gets its answer, not a reset connection.
    let big = d.join("big.json");
    std::fs::write(&big, format!("{{\"pad\": \"{}\"}}", "x".repeat(1_500_000))).unwrap();
    for path in ["/api/heartbeat", "/api/tokens"] {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .arg("--cacert")
            .arg(d.join("state/ca.crt"))
            // No `Expect: 100-continue`: the whole body comes at once, as most clients send it.
            .args(["-H", "content-type: application/json", "-H", "Expect:"])
            .arg("--data-binary")
            .arg(format!("@{}", big.display()))
            .arg(format!("https://127.0.0.1:{port}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401", "{path}");
    }

    // Bad input: the field is named; duplicates and bad names are refused; the last admin stays.
    let (status, err) = post(
        "/api/tokens",
        Some(&admin),
        json!({"name": "a", "role": "viewer", "colour": "red"}),
    );
    assert_eq!((status, err["code"].as_str()), (400, Some("BAD_REQUEST")));
    assert!(err["message"].as_str().unwrap().contains("colour"), "{err}");
    let (status, err) = post(
        "/api/tokens",
        Some(&admin),
        json!({"name": "a", "role": "root"}),
    );
    assert_eq!(status, 400, "{err}");
    assert!(err["message"].as_str().unwrap().contains("role"), "{err}");
    let (status, err) = post(
        "/api/tokens",
        Some(&admin),
        json!({"name": "../etc", "role": "viewer"}),
    );
    assert_eq!(status, 400, "{err}");
    let (status, err) = post(
        "/api/tokens",
        Some(&admin),
        json!({"name": "viewer1", "role": "viewer"}),
    );
    assert_eq!((status, err["code"].as_str()), (409, Some("CONFLICT")));
    let (status, err) = call(
        d,
        "127.0.0.1",
        &port,
        "DELETE",
        "/api/tokens/1",
        Some(&admin),
        None,
    );
    assert_eq!(status, 409, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("last admin"),
        "{err}"
    );
    let (status, err) = get("/api/tokens?limit=0", Some(&admin));
    assert_eq!(status, 400, "{err}");
    let (status, err) = get("/api/nowhere", Some(&admin));
    assert_eq!((status, err["code"].as_str()), (404, Some("NOT_FOUND")));

    // Pages: two at a time, following next_after to the end.
    let mut names = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = get(&format!("/api/tokens?limit=2&after={after}"), Some(&admin));
        assert_eq!(status, 200, "{page}");
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string()),
        );
        assert!(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t.get("token").is_none()),
            "secrets never listed"
        );
        match page["next_after"].as_i64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(names, ["admin", "viewer1", "operator1"]);

    // A token deleted no longer opens anything.
    let (status, _) = call(
        d,
        "127.0.0.1",
        &port,
        "DELETE",
        "/api/tokens/2",
        Some(&admin),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(get("/api/health", Some(viewer)).0, 401);

    // The audit log has the denials and the changes, with who made them.
    let (_, audit) = get("/api/audit?limit=500", Some(&admin));
    let entries = audit["items"].as_array().unwrap();
    let has = |actor: &str, action: &str, outcome: &str| {
        entries
            .iter()
            .any(|e| e["actor"] == actor && e["action"] == action && e["outcome"] == outcome)
    };
    assert!(has("anonymous", "GET /api/tokens", "denied"), "{audit}");
    assert!(has("viewer1", "POST /api/tokens", "denied"), "{audit}");
    assert!(has("operator1", "GET /api/audit", "denied"), "{audit}");
    assert!(has("admin", "POST /api/tokens", "ok"), "{audit}");
    assert!(has("admin", "DELETE /api/tokens/1", "failed"), "{audit}");
    assert!(has("admin", "DELETE /api/tokens/2", "ok"), "{audit}");

    // The OpenAPI document describes these paths.
    let (_, doc) = get("/api/openapi.json", Some(&admin));
    for path in [
        "/api/health",
        "/api/tokens",
        "/api/tokens/{id}",
        "/api/audit",
        "/api/openapi.json",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} in the OpenAPI document"
        );
    }
    assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
}

#[test]
fn init_refuses_a_used_directory_and_a_bad_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    boomerang(&["server", "init", state.to_str().unwrap()]);
    let again = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["server", "init", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a configuration server")
    );
    let config = state.join("server.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nlisten_port = 4\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["server", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(
        said.contains("listen_port") && said.contains("line 2"),
        "{said}"
    );
}

const INVENTORY: &str = r#"
[[site]]
name = "site-a"
kind = "local"

[[site]]
name = "site-b"
kind = "azure"

[[host]]
name = "esx-a1"
site = "site-a"

[[datastore]]
name = "ds-a1"
host = "esx-a1"
type = "VMFS"

[[machine]]
name = "web01"
site = "site-a"
host = "esx-a1"
datastore = "ds-a1"
os = { family = "linux", version = "9.2" }
tools = "running"
config = { "disk.EnableUUID" = "true" }
controllers = [{ name = "scsi0", kind = "lsi-logic" }]
disks = [{ name = "sda", size_bytes = 68719476736, uuid = "6000c291", controller = "scsi0" }]
nics = [{ name = "eth0", ips = ["10.0.0.5"] }]
"#;

#[test]
fn the_inventory_comes_from_toml_files_and_a_bad_file_changes_nothing() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (daemon, admin) = server_with(dir.path(), |state| with_inventory(state, INVENTORY, &[]));
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let d = dir.path();
    let get = |path: &str| call(d, "127.0.0.1", &port, "GET", path, Some(&admin), None);
    let (status, sites) = get("/api/sites");
    assert_eq!(status, 200, "{sites}");
    let kinds: Vec<_> = sites["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["local", "azure"]);
    assert_eq!(get("/api/datastores").1["items"][0]["type"], "VMFS");
    let (status, web01) = get("/api/machines/web01");
    assert_eq!(status, 200, "{web01}");
    assert_eq!(web01["disks"][0]["uuid"], "6000c291");
    assert_eq!(web01["config"]["disk.EnableUUID"], "true");
    let (status, err) = get("/api/machines/db01");
    assert_eq!((status, err["code"].as_str()), (404, Some("NOT_FOUND")));

    // An operator refreshes; a file with a syntax error is reported with its line and column,
    // and what the server holds stays as it was.
    let (_, made) = call(
        d,
        "127.0.0.1",
        &port,
        "POST",
        "/api/tokens",
        Some(&admin),
        Some(&json!({"name": "ops", "role": "operator"})),
    );
    let ops = made["token"].as_str().unwrap().to_string();
    let refresh = |token: &str| {
        call(
            d,
            "127.0.0.1",
            &port,
            "POST",
            "/api/inventory/refresh",
            Some(token),
            None,
        )
    };
    let inventory = d.join("state/inventory.toml");
    std::fs::write(
        &inventory,
        INVENTORY.replace("kind = \"azure\"", "kind = azure"),
    )
    .unwrap();
    let (status, err) = refresh(&ops);
    assert_eq!(status, 400, "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("inventory.toml") && message.contains("line 8"),
        "{message}"
    );
    std::fs::write(
        &inventory,
        INVENTORY.replace("site = \"site-a\"\nhost", "site = \"site-c\"\nhost"),
    )
    .unwrap();
    let (status, err) = refresh(&ops);
    assert_eq!(status, 400, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("\"site-c\""),
        "{err}"
    );
    assert_eq!(get("/api/machines").1["items"].as_array().unwrap().len(), 1);

    // A good file: a new machine appears after the others.
    let more = format!(
        "{INVENTORY}\n[[machine]]\nname = \"db01\"\nsite = \"site-a\"\nos = {{ family = \"windows\", version = \"2022\" }}\ntools = \"not-installed\"\nphysical = true\n"
    );
    std::fs::write(&inventory, more).unwrap();
    let (status, counts) = refresh(&ops);
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["machines"], 2);
    let machines = get("/api/machines").1;
    assert_eq!(machines["items"][0]["name"], "web01");
    assert_eq!(machines["items"][1]["name"], "db01");
    assert_eq!(machines["items"][1]["physical"], true);

    // A viewer may read the inventory, not refresh it.
    let (_, made) = call(
        d,
        "127.0.0.1",
        &port,
        "POST",
        "/api/tokens",
        Some(&admin),
        Some(&json!({"name": "eyes", "role": "viewer"})),
    );
    let viewer = made["token"].as_str().unwrap().to_string();
    assert_eq!(refresh(&viewer).0, 403);
    assert_eq!(
        call(
            d,
            "127.0.0.1",
            &port,
            "GET",
            "/api/hosts",
            Some(&viewer),
            None
        )
        .0,
        200
    );
}

#[test]
fn a_replication_policy_brings_its_failback_policy_which_cannot_be_edited() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (daemon, admin) = server(dir.path());
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let d = dir.path();
    let req = |method: &str, path: &str, token: &str, body: Option<Value>| {
        call(
            d,
            "127.0.0.1",
            &port,
            method,
            path,
            Some(token),
            body.as_ref(),
        )
    };
    let gold = json!({"name": "gold", "rpo_threshold_seconds": 30, "retention_seconds": 86400, "app_consistent_seconds": 3600});
    let (status, made) = req("POST", "/api/policies", &admin, Some(gold.clone()));
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["policy"]["kind"], "replication");
    assert_eq!(made["policy"]["rpo_threshold_seconds"], 30);
    let fb = &made["failback"];
    assert_eq!(fb["name"], "gold-failback");
    assert_eq!(fb["kind"], "failback");
    assert_eq!(fb["failback_of"], "gold");
    assert_eq!(fb["bound_to"], "configuration-server");
    assert_eq!(fb["editable"], false);
    assert_eq!(
        (
            &fb["rpo_threshold_seconds"],
            &fb["retention_seconds"],
            &fb["app_consistent_seconds"]
        ),
        (&json!(900), &json!(86400), &json!(3600))
    );

    // The failback policy refuses every edit, with the reason.
    let settings = json!({"rpo_threshold_seconds": 60, "retention_seconds": 3600, "app_consistent_seconds": 0});
    for (method, body) in [("PUT", Some(settings.clone())), ("DELETE", None)] {
        let (status, err) = req(method, "/api/policies/gold-failback", &admin, body);
        assert_eq!(
            (status, err["code"].as_str()),
            (409, Some("CONFLICT")),
            "{method}"
        );
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("cannot be edited"),
            "{err}"
        );
    }
    let (status, changed) = req("PUT", "/api/policies/gold", &admin, Some(settings));
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["rpo_threshold_seconds"], 60);
    assert_eq!(
        (&changed["sent"], &changed["left_out"]),
        (&json!([]), &json!([])),
        "no machine uses it yet: {changed}"
    );

    // Bad input, and roles.
    let (status, err) = req("POST", "/api/policies", &admin, Some(gold.clone()));
    assert_eq!(status, 409, "{err}");
    let mut bad = gold.clone();
    bad["name"] = json!("silver");
    bad["rpo_threshold_seconds"] = json!(0);
    let (status, err) = req("POST", "/api/policies", &admin, Some(bad));
    assert_eq!(status, 400, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("rpo_threshold_seconds"),
        "{err}"
    );
    let mut extra = gold.clone();
    extra["colour"] = json!("red");
    let (status, err) = req("POST", "/api/policies", &admin, Some(extra));
    assert_eq!(status, 400, "{err}");
    assert!(err["message"].as_str().unwrap().contains("colour"), "{err}");
    let (status, err) = req(
        "POST",
        "/api/policies",
        &admin,
        Some(json!({"name": "x", "rpo_threshold_seconds": 30})),
    );
    assert_eq!(status, 400, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("retention_seconds"),
        "{err}"
    );
    let (_, ops) = req(
        "POST",
        "/api/tokens",
        &admin,
        Some(json!({"name": "ops", "role": "operator"})),
    );
    let ops = ops["token"].as_str().unwrap().to_string();
    let mut other = gold.clone();
    other["name"] = json!("bronze");
    assert_eq!(req("POST", "/api/policies", &ops, Some(other)).0, 403);
    let (status, listed) = req("GET", "/api/policies", &ops, None);
    assert_eq!(status, 200);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);

    // Deleting the replication policy takes its failback policy along.
    assert_eq!(req("DELETE", "/api/policies/gold", &admin, None).0, 200);
    assert_eq!(
        req("GET", "/api/policies/gold-failback", &admin, None).0,
        404
    );
}

#[test]
fn preflight_over_the_api_checks_the_master_target_and_probes_the_process_server() {
    if !have("curl") {
        return;
    }
    // Something listens where the process server is said to be.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ps_addr = listener.local_addr().unwrap().to_string();
    let inventory = format!(
        r#"
[[site]]
name = "site-a"
kind = "local"
[[site]]
name = "site-b"
kind = "azure"
[[host]]
name = "esx-a1"
site = "site-a"
[[datastore]]
name = "ds-a1"
host = "esx-a1"
type = "VMFS"
[[machine]]
name = "web01"
site = "site-b"
os = {{ family = "linux", version = "9.2" }}
tools = "running"
disks = [{{ name = "sda", size_bytes = 1024, uuid = "u-1" }}]
[[machine]]
name = "mt-vm"
site = "site-a"
host = "esx-a1"
os = {{ family = "linux", version = "9.4" }}
tools = "running"
snapshots = 1
config = {{ "disk.EnableUUID" = "true" }}
[[master_target]]
name = "mt1"
site = "site-a"
machine = "mt-vm"
address = "10.0.0.9:9443"
retention = {{ path = "/mnt/retention", filesystem = "ext4", capacity_bytes = 1000000 }}
[[process_server]]
name = "ps1"
site = "site-b"
address = "{ps_addr}"
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let (daemon, admin) = server_with(dir.path(), |state| with_inventory(state, &inventory, &[]));
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let d = dir.path();
    let get = |path: &str| call(d, "127.0.0.1", &port, "GET", path, Some(&admin), None);
    let (status, report) = get("/api/machines/web01/preflight?for=failback");
    assert_eq!(status, 200, "{report}");
    let failed = |severity: &str| -> Vec<String> {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["passed"] == false && c["severity"] == severity)
            .map(|c| c["code"].as_str().unwrap().to_string())
            .collect()
    };
    // The master target's machine has a snapshot; everything else holds, the process server
    // answered. It is not enrolled, so its own links are unknown, no agent reports how fast
    // web01 writes, Azure site-b names no storage account, and the master target has not
    // reported where its stores are: warnings.
    assert_eq!(failed("error"), ["MT_HAS_SNAPSHOTS"], "{report}");
    assert_eq!(
        failed("warning"),
        [
            "PS_CS_UNREACHABLE",
            "PS_MT_UNREACHABLE",
            "PS_MACHINE_NETWORK",
            "PS_LINK_BANDWIDTH",
            "AZURE_STORAGE",
            "MT_STORE"
        ],
        "{report}"
    );
    assert_eq!(report["ok"], false);
    assert_eq!(report["for"], "failback");
    assert_eq!(report["master_target"], "mt1");

    // The failed preflight is an alert.
    let (_, alerts) = get("/api/alerts");
    let alert = &alerts["items"][0];
    assert_eq!(alert["kind"], "preflight-failed", "{alerts}");
    assert_eq!(alert["object"], "machine/web01/failback");
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("MT_HAS_SNAPSHOTS"),
        "{alert}"
    );

    // Nobody listens there any more.
    drop(listener);
    let (_, report) = get("/api/machines/web01/preflight?for=reprotect");
    let unreachable = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"] == "PS_UNREACHABLE")
        .unwrap();
    assert_eq!(unreachable["passed"], false, "{report}");
    assert!(unreachable["message"].as_str().unwrap().contains(&ps_addr));

    // A replication group: one master target, one OS family, 16 machines at most, a machine
    // in one group only; its rules join the preflight.
    let post = |body: Value| {
        call(
            d,
            "127.0.0.1",
            &port,
            "POST",
            "/api/groups",
            Some(&admin),
            Some(&body),
        )
    };
    let (status, err) = post(json!({"name": "shop", "machines": ["web01", "ghost"]}));
    assert_eq!(status, 404, "{err}");
    let (status, err) =
        post(json!({"name": "shop", "machines": ["web01", "mt-vm"], "master_target": "mt1"}));
    assert_eq!(status, 201, "{err}");
    let (status, err) = post(json!({"name": "shop2", "machines": ["web01"]}));
    assert_eq!(status, 409, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("one group at most"),
        "{err}"
    );
    let many: Vec<String> = (0..17).map(|i| format!("m{i}")).collect();
    let (status, err) = post(json!({"name": "big", "machines": many}));
    assert_eq!(status, 400, "{err}");
    let (_, report) = get("/api/machines/web01/preflight?for=failback");
    let codes: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"GROUP_MT_MISMATCH") && codes.contains(&"GROUP_OS_MISMATCH"),
        "{report}"
    );

    let (status, report) = get("/api/machines/ghost/preflight?for=failback");
    assert_eq!(status, 200);
    assert_eq!(report["checks"][1]["code"], "CS_MACHINE_UNKNOWN");
    assert_eq!(report["checks"][1]["passed"], false);
    let (status, err) = get("/api/machines/web01/preflight?for=dance");
    assert_eq!(status, 400, "{err}");
}

#[test]
fn the_cli_verbs_talk_to_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, admin) = server_with(dir.path(), |state| with_inventory(state, INVENTORY, &[]));
    let url = format!(
        "https://localhost:{}",
        daemon.addr.rsplit_once(':').unwrap().1
    );
    let ca = dir.path().join("state/ca.crt");
    let cli = |token: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args(args)
            .env("BOOMERANG_SERVER", &url)
            .env("BOOMERANG_CA", &ca)
            .env("BOOMERANG_TOKEN", token)
            .output()
            .unwrap()
    };
    let json_of = |out: std::process::Output| -> Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let sites = json_of(cli(&admin, &["site", "list", "--output", "json"]));
    assert_eq!(sites.as_array().unwrap().len(), 2);
    let machines = json_of(cli(&admin, &["machine", "list", "--output", "json"]));
    assert_eq!(machines[0]["name"], "web01");
    let web01 = json_of(cli(&admin, &["machine", "show", "web01"]));
    assert_eq!(web01["disks"][0]["name"], "sda");
    let human = cli(&admin, &["machine", "list"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("web01"));

    let made = json_of(cli(
        &admin,
        &[
            "policy",
            "create",
            "gold",
            "--rpo-threshold",
            "30",
            "--retention",
            "86400",
            "--output",
            "json",
        ],
    ));
    assert_eq!(made["failback"]["name"], "gold-failback");
    let policies = json_of(cli(&admin, &["policy", "list", "--output", "json"]));
    assert_eq!(policies.as_array().unwrap().len(), 2);

    // Preflight: no process server and no master target in this inventory: not ready, exit 3.
    let out = cli(
        &admin,
        &[
            "preflight",
            "web01",
            "--for",
            "failback",
            "--output",
            "json",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let table =
        String::from_utf8_lossy(&cli(&admin, &["preflight", "web01", "--for", "reprotect"]).stdout)
            .to_string();
    assert!(
        table.contains("PS_MISSING") && table.contains("FAILED") && table.contains("not ready"),
        "{table}"
    );

    // A component named, enrolled from its own machine, and serving with its certificate.
    let made = json_of(cli(
        &admin,
        &[
            "component",
            "create",
            "ps1",
            "--role",
            "process-server",
            "--site",
            "site-b",
            "--host",
            "127.0.0.1",
            "--output",
            "json",
        ],
    ));
    let one_time = made["enrollment_token"].as_str().unwrap();
    let identity = dir.path().join("ps1-tls");
    let token_file = dir.path().join("ps1.enrolment");
    std::fs::write(&token_file, one_time).unwrap();
    let out = cli(
        "",
        &[
            "component",
            "enroll",
            "--token-file",
            token_file.to_str().unwrap(),
            "--out",
            identity.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(identity.join("name")).unwrap(),
        "ps1",
        "the name it is started with when no --name is given"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(identity.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is the owner's alone");
    let token_file = identity.join("component.token");
    let ps = Daemon::start(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "process-server",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            identity.to_str().unwrap(),
            "--name",
            "ps1",
            "--cache",
            dir.path().join("cache").to_str().unwrap(),
            "--control-server",
            &url,
            "--control-ca",
            ca.to_str().unwrap(),
            "--component-token-file",
            token_file.to_str().unwrap(),
            "--heartbeat-interval",
            "0.2",
            // Nothing listens there: the heartbeats say the master target does not answer.
            "--master-target",
            "127.0.0.1:1",
        ],
    );
    assert!(ps.addr.starts_with("127.0.0.1:"));
    // Its heartbeats arrive, with the free space of its cache volume.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let ps1 = loop {
        let components = json_of(cli(&admin, &["component", "list", "--output", "json"]));
        if components[0]["health"] == "healthy" {
            break components[0].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no heartbeat: {components}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(ps1["name"], "ps1");
    assert!(ps1["last"]["free_bytes"].as_u64().unwrap() > 0, "{ps1}");
    assert_eq!(ps1["last"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ps1["last"]["master_target_reachable"], false, "{ps1}");

    // An agent reports too: its protected disks, the free space of its log volume.
    let made = json_of(cli(
        &admin,
        &[
            "component",
            "create",
            "web01",
            "--role",
            "agent",
            "--site",
            "site-a",
            "--output",
            "json",
        ],
    ));
    let agent_tls = dir.path().join("web01-tls");
    let agent_token = dir.path().join("web01.enrolment");
    std::fs::write(&agent_token, made["enrollment_token"].as_str().unwrap()).unwrap();
    let out = cli(
        "",
        &[
            "component",
            "enroll",
            "--token-file",
            agent_token.to_str().unwrap(),
            "--out",
            agent_tls.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk = dir.path().join("disk.img");
    boomerang_testkit::sparse_file(&disk, 1 << 20);
    let _agent = Daemon::start(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "agent",
            "--disk",
            &format!("d0={}", disk.display()),
            "--listen",
            "127.0.0.1:0",
            "--log-dir",
            dir.path().join("log").to_str().unwrap(),
            "--control-server",
            &url,
            "--control-ca",
            ca.to_str().unwrap(),
            "--component-token-file",
            agent_tls.join("component.token").to_str().unwrap(),
            "--heartbeat-interval",
            "0.2",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let components = json_of(cli(&admin, &["component", "list", "--output", "json"]));
        let web01 = components
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "web01")
            .cloned()
            .unwrap();
        if web01["health"] == "healthy" {
            assert_eq!(web01["last"]["attached_disks"], 1, "{web01}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no heartbeat from the agent: {components}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The preflights above failed: those are the alerts, and the human list says so.
    let alerts = json_of(cli(&admin, &["alert", "list", "--output", "json"]));
    let kinds: Vec<&str> = alerts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["preflight-failed", "preflight-failed"], "{alerts}");
    let table = String::from_utf8_lossy(&cli(&admin, &["alert", "list"]).stdout).to_string();
    assert!(
        table.contains("ACTIVE") && table.contains("machine/web01/failback"),
        "{table}"
    );

    // A component's certificate, from the same CA and valid for the same address, does not
    // pass for the configuration server: a server that shows it gets no token.
    let impostor = dir.path().join("impostor");
    std::fs::create_dir_all(&impostor).unwrap();
    std::fs::write(
        impostor.join("server.toml"),
        format!(
            "tls = {:?}\ndatabase = \"impostor.db\"\n",
            identity.display().to_string()
        ),
    )
    .unwrap();
    let fake = Daemon::start(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "server",
            "--config",
            impostor.join("server.toml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["site", "list"])
        .env("BOOMERANG_SERVER", format!("https://{}", fake.addr))
        .env("BOOMERANG_CA", &ca)
        .env("BOOMERANG_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the impostor was believed");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not reach"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(fake);

    // Tokens travel over HTTPS only.
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["site", "list"])
        .env("BOOMERANG_SERVER", url.replace("https://", "http://"))
        .env("BOOMERANG_CA", &ca)
        .env("BOOMERANG_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("https://"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A wrong token and a wrong CA are named.
    let out = cli("bmr_wrong", &["site", "list"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = tempfile::tempdir().unwrap();
    boomerang(&["pki", "init", other.path().join("ca").to_str().unwrap()]);
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["site", "list"])
        .env("BOOMERANG_SERVER", &url)
        .env("BOOMERANG_CA", other.path().join("ca/ca.crt"))
        .env("BOOMERANG_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not reach the configuration server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A client file instead of variables: the server, the CA and the token file, the paths
    // from the file's directory.
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join(".config/boomerang");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::copy(&ca, config.join("ca.crt")).unwrap();
    std::fs::write(config.join("token"), &admin).unwrap();
    std::fs::write(
        config.join("client.toml"),
        format!("server = \"{url}\"\nca = \"ca.crt\"\ntoken_file = \"token\"\n"),
    )
    .unwrap();
    let bare = |args: &[&str], env: &[(&str, &std::path::Path)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_boomerang"));
        cmd.args(args)
            .env_remove("BOOMERANG_SERVER")
            .env_remove("BOOMERANG_CA")
            .env_remove("BOOMERANG_TOKEN")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", home.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let sites = json_of(bare(&["site", "list", "--output", "json"], &[]));
    assert_eq!(sites.as_array().unwrap().len(), 2);
    let out = bare(&["site", "show", "site-b"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("azure"));
    // A broken client file is named, with the line.
    let broken = home.path().join("broken.toml");
    std::fs::write(&broken, "server = \"https://x\"\ncolour = 1\n").unwrap();
    let out = bare(
        &["site", "list"],
        &[("BOOMERANG_CLIENT_CONFIG", broken.as_path())],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success()
            && err.contains("broken.toml")
            && err.contains("colour")
            && err.contains("line 2"),
        "{err}"
    );
    // Without any: what to set.
    let out = bare(&["site", "list"], &[("HOME", dir.path())]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("BOOMERANG_SERVER") && err.contains("client.toml"),
        "{err}"
    );
}

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    if !have("schemathesis") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (daemon, admin) = server_with(dir.path(), |state| with_inventory(state, INVENTORY, &[]));
    let port = daemon.addr.rsplit_once(':').unwrap().1;
    // Every check, a bounded number of examples. Deleting tokens is left out: the fuzzer
    // would delete the token it runs with once it has made another admin.
    let out = Command::new("schemathesis")
        .arg("run")
        .arg(format!("https://localhost:{port}/api/openapi.json"))
        .args(["-H", &format!("Authorization: Bearer {admin}")])
        .arg("--tls-verify")
        .arg(dir.path().join("state/ca.crt"))
        .args([
            "--checks",
            "all",
            "--max-examples",
            "20",
            "--workers",
            "1",
            "--seed",
            "1",
        ])
        .args(["--exclude-path", "/api/tokens/{id}"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .current_dir(dir.path())
        .output()
        .expect("run schemathesis");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("passed"), "{said}");
}

#[test]
fn components_enrol_once_send_heartbeats_and_raise_an_alert_when_silent() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (daemon, admin) = server_with(dir.path(), |state| {
        with_inventory(
            state,
            INVENTORY,
            &[(
                "heartbeat_timeout_seconds = 90",
                "heartbeat_timeout_seconds = 2",
            )],
        )
    });
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let d = dir.path();
    let req = |method: &str, path: &str, token: Option<&str>, body: Option<Value>| {
        call(d, "127.0.0.1", &port, method, path, token, body.as_ref())
    };
    let (status, err) = req(
        "POST",
        "/api/components",
        Some(&admin),
        Some(json!({"name": "ps1", "role": "process-server", "site": "site-z"})),
    );
    assert_eq!(status, 404, "{err}");
    assert!(err["message"].as_str().unwrap().contains("site-z"), "{err}");
    // The server's own certificate name is not a component's.
    let (status, err) = req(
        "POST",
        "/api/components",
        Some(&admin),
        Some(json!({"name": "server", "role": "agent", "site": "site-b"})),
    );
    assert_eq!(status, 400, "{err}");
    let (status, enrolment) = req(
        "POST",
        "/api/components",
        Some(&admin),
        Some(
            json!({"name": "ps1", "role": "process-server", "site": "site-b", "hosts": ["127.0.0.1"]}),
        ),
    );
    assert_eq!(status, 201, "{enrolment}");
    let one_time = enrolment["enrollment_token"].as_str().unwrap().to_string();

    // Enrolment needs no bearer token, only the one-time token, and works once.
    let (status, enrolled) = req(
        "POST",
        "/api/enroll",
        None,
        Some(json!({"enrollment_token": one_time})),
    );
    assert_eq!(status, 200, "{enrolled}");
    let identity = d.join("ps1-identity");
    std::fs::create_dir_all(&identity).unwrap();
    for (file, field) in [
        ("cert.pem", "certificate"),
        ("key.pem", "key"),
        ("ca.crt", "ca"),
    ] {
        std::fs::write(identity.join(file), enrolled[field].as_str().unwrap()).unwrap();
    }
    boomerang_wire::tls::TlsIdentity::load(&identity).expect("the enrolled identity loads");
    assert_eq!(
        enrolled["ca"].as_str().unwrap(),
        std::fs::read_to_string(d.join("state/ca.crt")).unwrap()
    );
    assert!(
        !d.join("state/issued/ps1/key.pem").exists(),
        "the server keeps no component key"
    );
    let (status, _) = req(
        "POST",
        "/api/enroll",
        None,
        Some(json!({"enrollment_token": one_time})),
    );
    assert_eq!(status, 401, "a used enrolment token");
    let component = enrolled["component_token"].as_str().unwrap().to_string();

    let health = || {
        let (_, page) = req("GET", "/api/components", Some(&admin), None);
        page["items"][0]["health"].as_str().unwrap().to_string()
    };
    assert_eq!(health(), "never-seen");
    let beat = json!({"healthy": true, "version": "0.1.0", "free_bytes": 1000});
    assert_eq!(
        req(
            "POST",
            "/api/heartbeat",
            Some(&component),
            Some(beat.clone())
        )
        .0,
        204
    );
    assert_eq!(health(), "healthy");
    assert_eq!(
        req("POST", "/api/heartbeat", Some(&admin), Some(beat.clone())).0,
        401,
        "users send no heartbeats"
    );

    // Silence past the timeout: unhealthy, and an alert; a heartbeat resolves it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let alert = loop {
        let (_, alerts) = req("GET", "/api/alerts", Some(&admin), None);
        if let Some(a) = alerts["items"].as_array().unwrap().first() {
            break a.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no alert for a silent component"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(health(), "unhealthy");
    assert_eq!(alert["kind"], "component-unhealthy");
    assert_eq!(alert["object"], "component/ps1");
    assert!(
        alert["message"].as_str().unwrap().contains("ps1"),
        "{alert}"
    );
    assert!(alert.get("resolved_unix_ms").is_none());
    assert_eq!(
        req("POST", "/api/heartbeat", Some(&component), Some(beat)).0,
        204
    );
    let (_, alerts) = req("GET", "/api/alerts", Some(&admin), None);
    assert_eq!(alerts["items"].as_array().unwrap().len(), 1, "{alerts}");
    assert!(alerts["items"][0]["resolved_unix_ms"].is_i64(), "{alerts}");
}

#[test]
fn a_full_database_volume_fails_requests_cleanly_and_writes_nothing_half() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(_volume) = boomerang_testkit::SmallVolume::mount(&state, "4m") else {
        return;
    };
    let (daemon, admin) = server(dir.path());
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let d = dir.path();
    let req = |method: &str, path: &str, body: Option<Value>| {
        call(
            d,
            "127.0.0.1",
            &port,
            method,
            path,
            Some(&admin),
            body.as_ref(),
        )
    };
    // Something else fills the volume.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[7u8; 4096]).is_ok() {}
    }
    let mut full = None;
    for i in 0..300 {
        let body = json!({"name": format!("p{i}"), "rpo_threshold_seconds": 30, "retention_seconds": 3600, "app_consistent_seconds": 0});
        let (status, answer) = req("POST", "/api/policies", Some(body));
        if status != 201 {
            full = Some((status, answer));
            break;
        }
    }
    let (status, err) = full.expect("the database never hit the full volume");
    assert_eq!(
        (status, err["code"].as_str()),
        (507, Some("STORAGE_FULL")),
        "{err}"
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("nothing of this request was written")
    );
    // Every replication policy has its failback policy: none was half made.
    let (status, listed) = req("GET", "/api/policies?limit=500", None);
    assert_eq!(status, 200, "{listed}");
    let items = listed["items"].as_array().unwrap();
    let replication = items.iter().filter(|p| p["kind"] == "replication").count();
    let failback = items.iter().filter(|p| p["kind"] == "failback").count();
    assert_eq!(replication, failback, "{listed}");

    // Space returns: the server goes on.
    std::fs::remove_file(&filler).unwrap();
    let body = json!({"name": "after", "rpo_threshold_seconds": 30, "retention_seconds": 3600, "app_consistent_seconds": 0});
    assert_eq!(req("POST", "/api/policies", Some(body)).0, 201);
}

/// Names component `name` and enrols it: its identity directory (certificate, key, CA and
/// component token), as `boomerang component enroll` would write it.
fn enrol(
    dir: &Path,
    port: &str,
    admin: &str,
    name: &str,
    role: &str,
    site: &str,
) -> std::path::PathBuf {
    enrol_with(
        dir,
        port,
        admin,
        json!({"name": name, "role": role, "site": site, "hosts": ["127.0.0.1"]}),
    )
}

/// Enrols the component `body` describes; its identity directory.
fn enrol_with(dir: &Path, port: &str, admin: &str, body: Value) -> std::path::PathBuf {
    let name = body["name"].as_str().unwrap().to_string();
    let (status, made) = call(
        dir,
        "127.0.0.1",
        port,
        "POST",
        "/api/components",
        Some(admin),
        Some(&body),
    );
    assert_eq!(status, 201, "{made}");
    let (status, got) = call(
        dir,
        "127.0.0.1",
        port,
        "POST",
        "/api/enroll",
        None,
        Some(&json!({"enrollment_token": made["enrollment_token"]})),
    );
    assert_eq!(status, 200, "{got}");
    let identity = dir.join(format!("{name}-identity"));
    std::fs::create_dir_all(&identity).unwrap();
    for (file, field) in [
        ("cert.pem", "certificate"),
        ("key.pem", "key"),
        ("ca.crt", "ca"),
        ("component.token", "component_token"),
    ] {
        std::fs::write(identity.join(file), got[field].as_str().unwrap()).unwrap();
    }
    identity
}

/// A configuration server (heartbeat timeout 3 s) with three enrolled components replicating
/// machine app01 (no inventory file lists it): master target mt1 (retention `d/retention`,
/// a point at every mark), process server ps1 (forwarding through `link`, a fault proxy) and
/// app01's agent (disk d0, 4 MiB of 0x5a, a mark every 0.3 s).
struct Replicating {
    _server: Daemon,
    admin: String,
    port: String,
    url: String,
    ca: std::path::PathBuf,
    _mt: Daemon,
    /// How the master target was started, to start it again.
    mt_args: Vec<String>,
    /// What it had added to its environment.
    mt_env: Vec<(String, String)>,
    _ps: Daemon,
    /// How the process server was started, to start it again.
    ps_args: Vec<String>,
    agent: Daemon,
    link: boomerang_testkit::FaultProxy,
}

impl Replicating {
    fn start(d: &Path) -> Replicating {
        Self::start_with(d, &[])
    }

    /// [`Replicating::start`], with `mt_extra` arguments for the master target.
    fn start_with(d: &Path, mt_extra: &[String]) -> Replicating {
        Self::start_full(d, mt_extra, &[], "")
    }

    /// [`Replicating::start_with`], with `mt_env` added to the master target's environment
    /// and `server_toml` to the server's configuration.
    fn start_full(
        d: &Path,
        mt_extra: &[String],
        mt_env: &[(&str, &str)],
        server_toml: &str,
    ) -> Replicating {
        let (server, admin) = server_with(d, |state| {
            with_inventory(
                state,
                INVENTORY,
                &[(
                    "heartbeat_timeout_seconds = 90",
                    "heartbeat_timeout_seconds = 3",
                )],
            );
            let config = state.join("server.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, text + server_toml).unwrap();
        });
        let port = server.addr.rsplit_once(':').unwrap().1.to_string();
        let url = format!("https://127.0.0.1:{port}");
        let ca = d.join("state/ca.crt");
        let control = |identity: &Path| -> Vec<String> {
            vec![
                "--control-server".into(),
                url.clone(),
                "--control-ca".into(),
                ca.display().to_string(),
                "--component-token-file".into(),
                identity.join("component.token").display().to_string(),
                "--heartbeat-interval".into(),
                "0.2".into(),
            ]
        };
        let start = |args: Vec<String>| {
            Daemon::start(
                env!("CARGO_BIN_EXE_boomerang"),
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        };
        let mt1 = enrol(d, &port, &admin, "mt1", "master-target", "site-b");
        let ps1 = enrol(d, &port, &admin, "ps1", "process-server", "site-b");
        let app01 = enrol(d, &port, &admin, "app01", "agent", "site-a");
        let mut args: Vec<String> = [
            "master-target",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            mt1.to_str().unwrap(),
            "--name",
            "mt1",
            "--retention",
            d.join("retention").to_str().unwrap(),
            "--block-size",
            "4KiB",
            "--point-every",
            "0",
        ]
        .map(String::from)
        .to_vec();
        args.extend(control(&mt1));
        args.extend(mt_extra.iter().cloned());
        let mt_args = args.clone();
        let mt = Daemon::start_env(
            env!("CARGO_BIN_EXE_boomerang"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            mt_env,
        );
        let link = boomerang_testkit::FaultProxy::start(&mt.addr);
        let mut args: Vec<String> = [
            "process-server",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            ps1.to_str().unwrap(),
            "--name",
            "ps1",
            "--cache",
            d.join("cache").to_str().unwrap(),
            "--master-target",
            link.addr(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(control(&ps1));
        let mut ps_args = args.clone();
        let ps = start(args);
        // Started again, it listens where the agent reaches it.
        ps_args[2] = ps.addr.clone();
        // A disk with content, so that there is a copy to make.
        let disk = d.join("disk.img");
        std::fs::write(&disk, vec![0x5a; 4 << 20]).unwrap();
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--disk".into(),
            format!("d0={}", disk.display()),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--log-dir".into(),
            d.join("log").display().to_string(),
            "--process-server".into(),
            ps.addr.clone(),
            "--tls".into(),
            app01.display().to_string(),
            "--name".into(),
            "app01".into(),
            "--mark-interval".into(),
            "0.3".into(),
        ];
        args.extend(control(&app01));
        let agent = start(args);
        Replicating {
            _server: server,
            admin,
            port,
            url,
            ca,
            _mt: mt,
            mt_args,
            mt_env: mt_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _ps: ps,
            ps_args,
            agent,
            link,
        }
    }

    /// Starts the process server again (after a kill), at the same address, on its cache.
    fn restart_ps(&mut self) {
        self._ps = Daemon::start(
            env!("CARGO_BIN_EXE_boomerang"),
            &self.ps_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    /// Kills the configuration server (`kill -9`) and starts it again on the same state and
    /// port: the components reach it again at the address they know.
    fn restart_server(&mut self, d: &Path) {
        self._server.signal("-KILL");
        let config = d.join("state/server.toml");
        let listen = format!("127.0.0.1:{}", self.port);
        self._server = Daemon::start(
            env!("CARGO_BIN_EXE_boomerang"),
            &[
                "server",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                &listen,
            ],
        );
    }

    /// Kills the master target (`kill -9`) and starts it again on the same retention volume
    /// (on another port: the process server reaches it through `link`, which is not moved,
    /// so only recoveries are looked at after this).
    fn restart_mt(&mut self) {
        self._mt.signal("-KILL");
        self._mt = Daemon::start_env(
            env!("CARGO_BIN_EXE_boomerang"),
            &self.mt_args.iter().map(String::as_str).collect::<Vec<_>>(),
            &self
                .mt_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
        );
    }

    /// The flags that connect a component with identity `identity` to this server.
    fn control(&self, identity: &Path) -> Vec<String> {
        vec![
            "--control-server".into(),
            self.url.clone(),
            "--control-ca".into(),
            self.ca.display().to_string(),
            "--component-token-file".into(),
            identity.join("component.token").display().to_string(),
            "--heartbeat-interval".into(),
            "0.2".into(),
        ]
    }

    /// Starts `boomerang` with `args`, then the flags that connect `identity` to this server.
    fn component(&self, args: &[&str], identity: &Path) -> Daemon {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(self.control(identity));
        Daemon::start(
            env!("CARGO_BIN_EXE_boomerang"),
            &all.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    /// Runs the CLI with this server and the admin token.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args(args)
            .env("BOOMERANG_SERVER", &self.url)
            .env("BOOMERANG_CA", &self.ca)
            .env("BOOMERANG_TOKEN", &self.admin)
            .output()
            .unwrap()
    }
}

fn json_out(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Calls `ok` every 200 ms until it gives a value, for at most `secs`.
fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> Option<Value>) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn status_follows_a_machine_from_its_agents_report_to_protected_and_an_rpo_over_its_threshold_raises_an_alert()
 {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = Replicating::start(d);
    let (admin, port, link) = (&r.admin, &r.port, &r.link);
    let cli = |args: &[&str]| r.cli(args);
    let json_of = json_out;
    let wait = |what: &str, secs: u64, ok: Box<dyn FnMut() -> Option<Value> + '_>| -> Value {
        wait_for(what, secs, ok)
    };

    // No inventory file lists app01: its agent's report brings it in, as a physical machine.
    let machine = wait(
        "the agent's report never brought app01 into the inventory",
        20,
        Box::new(|| {
            let out = cli(&["machine", "show", "app01", "--output", "json"]);
            out.status.success().then(|| json_of(&out))
        }),
    );
    assert_eq!(machine["source"], "agent", "{machine}");
    assert_eq!(machine["site"], "site-a");
    assert_eq!(machine["physical"], true);
    assert_eq!(machine["os"]["family"], "linux");
    assert_eq!(machine["disks"][0]["name"], "d0");
    assert_eq!(machine["disks"][0]["size_bytes"], 4 << 20);

    let out = cli(&[
        "policy",
        "create",
        "gold",
        "--rpo-threshold",
        "2",
        "--retention",
        "3600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["machine", "set-policy", "app01", "gold-failback"]);
    assert!(
        !out.status.success(),
        "a failback policy is not given by hand"
    );
    let out = cli(&["machine", "set-policy", "app01", "gold"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Protected once the copy is whole at the master target, with points and a small RPO.
    let status = wait(
        "app01 never became protected",
        60,
        Box::new(|| {
            let out = cli(&["status", "app01", "--output", "json"]);
            let s = json_of(&out);
            (s["state"] == "protected" && s["disks"][0]["points"].as_u64() > Some(0)).then_some(s)
        }),
    );
    assert_eq!(status["policy"], "gold", "{status}");
    assert_eq!(status["agent"], "app01");
    assert_eq!(status["process_servers"], json!(["ps1"]));
    assert_eq!(status["master_targets"], json!(["mt1"]));
    assert_eq!(status["disks"][0]["sync"], "in-sync");
    let rpo = status["rpo_seconds"].as_f64().unwrap();
    assert!(rpo < 2.0, "{status}");
    let table = String::from_utf8_lossy(&cli(&["status"]).stdout).to_string();
    assert!(
        table.contains("app01") && table.contains("protected"),
        "{table}"
    );
    // web01 has no agent: it is listed, unprotected.
    assert!(
        table.contains("web01") && table.contains("unprotected"),
        "{table}"
    );

    // A policy in use cannot go.
    let (code, err) = call(
        d,
        "127.0.0.1",
        port,
        "DELETE",
        "/api/policies/gold",
        Some(admin),
        None,
    );
    assert_eq!(code, 409, "{err}");
    assert!(err["message"].as_str().unwrap().contains("app01"), "{err}");

    // The link to the master target stalls: no mark becomes durable there, the RPO grows past
    // the policy's 2 s threshold, and an alert says so.
    link.set_delay(std::time::Duration::from_secs(6));
    let alert = wait(
        "no RPO alert while the link stalled",
        30,
        Box::new(|| {
            let alerts = json_of(&cli(&["alert", "list", "--output", "json"]));
            alerts
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["kind"] == "rpo-threshold" && a.get("resolved_unix_ms").is_none())
                .cloned()
        }),
    );
    assert_eq!(alert["object"], "machine/app01", "{alert}");
    assert!(
        alert["message"].as_str().unwrap().contains("gold"),
        "{alert}"
    );
    let out = cli(&["status", "app01", "--output", "json"]);
    assert_eq!(out.status.code(), Some(3), "an unhealthy machine exits 3");
    let s = json_of(&out);
    assert_ne!(s["health"], "healthy", "{s}");
    assert!(s["rpo_seconds"].as_f64().unwrap() > 2.0, "{s}");

    // The link recovers: the RPO comes back under the threshold and the alert resolves.
    link.set_delay(std::time::Duration::ZERO);
    wait(
        "the RPO alert did not resolve after the link recovered",
        60,
        Box::new(|| {
            let alerts = json_of(&cli(&["alert", "list", "--output", "json"]));
            alerts
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["kind"] == "rpo-threshold" && a["resolved_unix_ms"].is_i64())
                .then_some(Value::Null)
        }),
    );
    // Protected anew with a policy that wants an app-consistent mark every second: the
    // agent takes them from then on, with no --app-mark-interval.
    let out = cli(&[
        "policy",
        "create",
        "silver",
        "--rpo-threshold",
        "60",
        "--retention",
        "3600",
        "--app-consistent",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["protect", "app01", "--policy", "silver", "--output", "json"]);
    let job = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{job}");
    assert_eq!(job["result"]["app_consistent_seconds"], 1.0, "{job}");
    wait(
        "the policy's app-consistent marks never came",
        30,
        Box::new(|| {
            listed_points(d)?
                .iter()
                .any(|p| p["kind"] == "app")
                .then_some(Value::Null)
        }),
    );
    let out = cli(&["machine", "clear-policy", "app01"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = json_of(&cli(&["status", "app01", "--output", "json"]));
    assert!(s.get("policy").is_none(), "{s}");
}

#[test]
fn a_test_failover_serves_the_disks_at_a_point_isolated_and_its_cleanup_removes_them() {
    if !have("curl") || !have("nbdinfo") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = Replicating::start(d);
    let retention = d.join("retention");
    // A machine that is not protected has nothing to fail over to.
    let out = r.cli(&["test-failover", "web01", "--output", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let job = json_out(&out);
    assert_eq!(job["state"], "failed");
    assert!(
        job["message"].as_str().unwrap().contains("not protected"),
        "{job}"
    );

    // app01 writes, and is protected: the protect job gives it its policy and follows its
    // initial sync to the end.
    let mut client = boomerang_testkit::RawNbd::connect(&r.agent.addr, "d0").unwrap();
    assert_eq!(client.write(1, 8192, &[0x77; 8192]).unwrap(), 0);
    r.gold_policy();
    let out = r.cli(&["protect", "app01", "--policy", "gold", "--output", "json"]);
    let protected = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{protected}");
    assert_eq!(
        protected["result"]["retention_seconds"], 3600,
        "{protected}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("log/app-mark-interval")).unwrap(),
        "0",
        "the agent keeps the policy's app-consistent schedule (none)"
    );
    let kept = std::fs::read_to_string(d.join("retention/replicas/app01/retention")).unwrap();
    assert_eq!(
        kept, "3600",
        "the master target keeps the points as the policy says"
    );
    let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(
        (&s["state"], &s["policy"]),
        (&json!("protected"), &json!("gold"))
    );

    // An edit of the policy reaches the machine it protects: a protect job sends it to the
    // master target and the agent.
    let (code, edited) = call(
        d,
        "127.0.0.1",
        &r.port,
        "PUT",
        "/api/policies/gold",
        Some(&r.admin),
        Some(
            &json!({"rpo_threshold_seconds": 30, "retention_seconds": 7200, "app_consistent_seconds": 0}),
        ),
    );
    assert_eq!(code, 200, "{edited}");
    wait_for(
        "the edited policy never reached the master target",
        60,
        || {
            let kept =
                std::fs::read_to_string(d.join("retention/replicas/app01/retention")).ok()?;
            (kept == "7200").then_some(Value::Null)
        },
    );
    let jobs = json_out(&r.cli(&["job", "list", "--output", "json"]));
    let pushed = jobs
        .as_array()
        .unwrap()
        .iter()
        .rfind(|j| j["kind"] == "protect")
        .cloned()
        .unwrap();
    assert_ne!(pushed["id"], protected["id"], "{jobs}");
    // The answer to the edit names the job that sends it, and leaves no machine out.
    assert_eq!(
        edited["sent"],
        json!([{"machine": "app01", "job": pushed["id"]}]),
        "{edited}"
    );
    assert_eq!(edited["left_out"], json!([]), "{edited}");
    assert_eq!(edited["retention_seconds"], 7200, "{edited}");
    wait_for("the protect job of the edit never ended", 30, || {
        let job = json_out(&r.cli(&["job", "show", &pushed["id"].to_string(), "--output", "json"]));
        (job["state"] == "succeeded").then_some(job)
    });

    // One app-consistent mark among the crash marks (every 0.3 s): the point asked for.
    let mark = json_out(
        &Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args(["agent", "mark", "--app", "--log-dir"])
            .arg(d.join("log"))
            .args(["--output", "json"])
            .output()
            .unwrap(),
    );
    let app_seq = mark["seq"].as_u64().unwrap();
    wait_for("the app-consistent mark never became a point", 30, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        (s["disks"][0]["latest_point_seq"].as_u64()? > app_seq).then_some(s)
    });
    let out = r.cli(&[
        "test-failover",
        "app01",
        "--at",
        "latest-app-consistent",
        "--output",
        "json",
    ]);
    let job = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{job}");
    assert_eq!(job["state"], "succeeded");
    let result = &job["result"];
    assert_eq!(result["seq"], app_seq, "not a later crash-consistent point");
    assert_eq!(result["master_target"], "mt1");
    assert_eq!(result["exports"], json!(["d0"]));
    let (address, seq) = (
        result["address"].as_str().unwrap().to_string(),
        result["seq"].as_u64().unwrap(),
    );
    // Served at once: the disk at that point, as the master target exports it.
    let url = format!("nbd://{address}/d0");
    let size = boomerang_testkit::run("nbdinfo", &["--size", &url]);
    assert_eq!(size.trim(), (4u64 << 20).to_string());
    let served = d.join("served.img");
    boomerang_testkit::run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            served.to_str().unwrap(),
        ],
    );
    let exported = d.join("exported.img");
    boomerang(&[
        "master-target",
        "export",
        retention.to_str().unwrap(),
        "--machine",
        "app01",
        "--disk",
        "d0",
        "--at",
        &seq.to_string(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    let point = std::fs::read(&exported).unwrap();
    assert!(std::fs::read(&served).unwrap() == point);
    assert_eq!(point[8192..16384], [0x77; 8192]);

    // Isolated: the test machine's writes stay in its scratch disk; the replica, and the
    // source, do not see them; and replication goes on.
    boomerang_testkit::run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xee 0 65536", &url],
    );
    assert_eq!(client.write(2, 1 << 20, &[0x99; 4096]).unwrap(), 0);
    let replica = retention.join("replicas/app01/d0.img");
    wait_for("replication stopped during the test failover", 30, || {
        let image = std::fs::read(&replica).unwrap();
        (image[1 << 20..(1 << 20) + 4096] == [0x99; 4096]).then_some(Value::Null)
    });
    let image = std::fs::read(&replica).unwrap();
    assert_eq!(
        image[..65536],
        point[..65536],
        "the replica never sees a test write"
    );
    let scratch = retention.join(format!("test-failovers/job-{}", job["id"]));
    assert!(scratch.join("d0.img").exists());

    // Cleanup: the disks are no longer served and the scratch disks are gone.
    let out = r.cli(&["test-failover", "app01", "--cleanup", "--output", "json"]);
    let cleanup = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{cleanup}");
    assert!(!scratch.exists(), "{}", scratch.display());
    let gone = Command::new("nbdinfo")
        .args(["--size", &url])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "still served after the cleanup");
    let jobs = json_out(&r.cli(&["job", "list", "--output", "json"]));
    let states: Vec<(&str, &str)> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["kind"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("test-failover", "failed"),
            ("protect", "succeeded"),
            // (The policy's edit.)
            ("protect", "succeeded"),
            ("test-failover", "succeeded"),
            ("test-failover-cleanup", "succeeded")
        ]
    );
    // A job that ended cannot be cancelled.
    let out = r.cli(&["job", "cancel", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ended"));
}

#[test]
fn a_planned_failover_stops_the_source_and_serves_its_disks_with_nothing_lost() {
    if !have("curl") || !have("qemu-img") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = Replicating::start(d);
    wait_for("app01 never became protected", 60, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        (s["state"] == "protected").then_some(s)
    });
    // The machine writes until the very moment of the failover.
    let mut client = boomerang_testkit::RawNbd::connect(&r.agent.addr, "d0").unwrap();
    for i in 0..64u64 {
        let block = vec![(i % 251) as u8 + 1; 4096];
        assert_eq!(client.write(i + 1, i * 40960, &block).unwrap(), 0);
    }
    // The configuration server is killed right after the job is asked for, and started
    // again: the job goes on from the step it was at.
    let out = r.cli(&[
        "failover",
        "app01",
        "--planned",
        "--no-wait",
        "--output",
        "json",
    ]);
    let id = json_out(&out)["id"].as_i64().unwrap().to_string();
    r.restart_server(d);
    let job = wait_for("the failover never ended after the restart", 60, || {
        let job = json_out(&r.cli(&["job", "show", &id, "--output", "json"]));
        (job["state"] != "running").then_some(job)
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    let result = &job["result"];
    assert_eq!(result["planned"], true, "{job}");
    let address = result["address"].as_str().unwrap();
    // The source takes no more writes: it cannot diverge from its failed-over copy.
    assert_ne!(client.write(100, 0, &[0xaa; 4096]).unwrap(), 0);
    let source = std::fs::read(d.join("disk.img")).unwrap();
    assert_eq!(
        source[..4096],
        [1; 4096],
        "the refused write did not reach the disk"
    );
    // The failed-over disk is the source as it stopped: every acknowledged write is there.
    let url = format!("nbd://{address}/d0");
    let served = d.join("served.img");
    boomerang_testkit::run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            served.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&served).unwrap() == source, "nothing lost");
    // The machine runs there now; its disk is hydrated into a whole disk at the master target.
    boomerang_testkit::run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xfe 4096 4096", &url],
    );
    let target = d.join("retention/failovers/app01/d0.img");
    let state = format!("{}.recovery", target.display());
    wait_for("the failed-over disk was never hydrated", 30, || {
        let s: Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        (s["hydrated"] == true).then_some(s)
    });
    let mut want = source.clone();
    want[4096..8192].fill(0xfe);
    assert!(std::fs::read(&target).unwrap() == want);
    let status = wait_for(
        "the master target never said the failover is copied",
        10,
        || {
            let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
            (s["failover"]["hydrated_percent"] == 100.0).then_some(s)
        },
    );
    assert_eq!(status["state"], "failed-over", "{status}");
    assert_eq!(status["failover"]["address"], address);

    // The master target is killed and started again: it serves the failed-over disks again
    // (at a new address, which the status follows), with what the machine wrote there.
    r.restart_mt();
    // The old process is gone: an address that answers is the new one's.
    let again = wait_for(
        "the failover was not served again after a restart",
        20,
        || {
            let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
            let url = format!("nbd://{}/d0", s["failover"]["address"].as_str()?);
            let answers = Command::new("nbdinfo")
                .args(["--size", &url])
                .output()
                .is_ok_and(|o| o.status.success());
            answers.then_some(Value::String(url))
        },
    );
    let again = again.as_str().unwrap().to_string();
    boomerang_testkit::run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &again,
            served.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&served).unwrap() == want,
        "served again, as written"
    );
    // Once failed over, not again.
    let out = r.cli(&["failover", "app01", "--output", "json"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        json_out(&out)["message"]
            .as_str()
            .unwrap()
            .contains("failed over already")
    );

    // Another point instead, before the commit: the disk there, the new writes dropped.
    let final_seq = result["seq"].as_u64().unwrap();
    let earlier = listed_points(d)
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .rfind(|s| *s < final_seq)
        .unwrap();
    let out = r.cli(&[
        "change-point",
        "app01",
        "--at",
        &earlier.to_string(),
        "--output",
        "json",
    ]);
    let changed = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{changed}");
    assert_eq!(changed["result"]["seq"], earlier);
    let exported = d.join("earlier.img");
    boomerang(&[
        "master-target",
        "export",
        d.join("retention").to_str().unwrap(),
        "--machine",
        "app01",
        "--disk",
        "d0",
        "--at",
        &earlier.to_string(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    let url = format!(
        "nbd://{}/d0",
        changed["result"]["address"].as_str().unwrap()
    );
    boomerang_testkit::run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            served.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&served).unwrap() == std::fs::read(&exported).unwrap());
    // Committed, the point is final.
    let out = r.cli(&["commit", "app01", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let out = r.cli(&[
        "change-point",
        "app01",
        "--at",
        "latest",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        json_out(&out)["message"]
            .as_str()
            .unwrap()
            .contains("committed")
    );
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(status["failover"]["committed"], true, "{status}");
}

/// Bytes of write data the master target with retention volume `retention` has received of
/// `machine` (its incoming log keeps every record for a day); 0 before any.
fn received_write_bytes(retention: &Path, machine: &str) -> u64 {
    let log = retention.join("incoming").join(machine);
    if !log.exists() {
        return 0;
    }
    let state: Value = serde_json::from_str(&boomerang(&[
        "agent",
        "log",
        "inspect",
        log.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    state["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes_written"].as_u64().unwrap())
        .sum()
}

/// Waits (30 s at most) until the files `a` and `b` hold the same bytes: a replica's applier
/// puts what is durable at its master target into its image a little later.
fn same_soon(a: &Path, b: &Path, what: &str) {
    wait_for(what, 30, || {
        (std::fs::read(a).unwrap() == std::fs::read(b).unwrap()).then_some(Value::Null)
    });
}

/// The recovery points of app01's d0 that the master target's volume `d/retention` lists, if
/// it lists them now.
fn listed_points(d: &Path) -> Option<Vec<Value>> {
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["master-target", "points"])
        .arg(d.join("retention"))
        .args(["--machine", "app01", "--disk", "d0", "--output", "json"])
        .output()
        .ok()?;
    let points: Value = serde_json::from_slice(&out.stdout).ok()?;
    points.as_array().cloned()
}

/// Inserts a crash-consistent mark in the write log in `log`; its seq.
fn mark_now(log: &Path) -> u64 {
    json_out(
        &Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args(["agent", "mark", "--log-dir"])
            .arg(log)
            .args(["--output", "json"])
            .output()
            .unwrap(),
    )["seq"]
        .as_u64()
        .unwrap()
}

/// A TCP address on loopback that nothing listens on now.
fn free_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

impl Replicating {
    /// Creates policy gold: an RPO threshold of 30 s, points kept an hour.
    fn gold_policy(&self) {
        let out = self.cli(&[
            "policy",
            "create",
            "gold",
            "--rpo-threshold",
            "30",
            "--retention",
            "3600",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a job through the CLI (`args`, with JSON output) and checks that it succeeded.
    fn job_ok(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli(&all);
        let job = json_out(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {job}");
        assert_eq!(job["state"], "succeeded", "{job}");
        job
    }

    /// Runs a job through the CLI and checks that it failed with a message holding `why`.
    fn job_fails(&self, args: &[&str], why: &str) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli(&all);
        let job = json_out(&out);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {job}");
        assert!(job["message"].as_str().unwrap().contains(why), "{job}");
        job
    }
}

/// The way back of a [`Replicating`] setup: a master target at site A (`mta`, retention
/// `d/retention-a`), a process server at site B toward it (`ps2`), and an agent of app01
/// standing by at site B (`app01-b`, at a fixed address).
struct WayBack {
    retention_a: std::path::PathBuf,
    mta: Option<Daemon>,
    mta_args: Vec<String>,
    mta_identity: std::path::PathBuf,
    _ps2: Daemon,
    agent_b: Daemon,
}

impl WayBack {
    fn start(r: &Replicating, d: &Path) -> WayBack {
        // The way back: a master target at site A, a process server at site B toward it, and an
        // agent of app01 standing by at site B.
        let mta = enrol(d, &r.port, &r.admin, "mta", "master-target", "site-a");
        let ps2 = enrol(d, &r.port, &r.admin, "ps2", "process-server", "site-b");
        let app01b = enrol_with(
            d,
            &r.port,
            &r.admin,
            json!({"name": "app01-b", "role": "agent", "site": "site-b", "machine": "app01"}),
        );
        let retention_a = d.join("retention-a");
        // At a fixed address, so that it can be started again where ps2 reaches it.
        let mta_args: Vec<String> = [
            "master-target",
            "--listen",
            &free_address(),
            "--tls",
            mta.to_str().unwrap(),
            "--name",
            "mta",
            "--retention",
            retention_a.to_str().unwrap(),
            "--block-size",
            "4KiB",
            "--point-every",
            "0",
        ]
        .map(String::from)
        .to_vec();
        let mta_daemon = r.component(
            &mta_args.iter().map(String::as_str).collect::<Vec<_>>(),
            &mta,
        );
        let ps2_daemon = r.component(
            &[
                "process-server",
                "--listen",
                "127.0.0.1:0",
                "--tls",
                ps2.to_str().unwrap(),
                "--name",
                "ps2",
                "--cache",
                d.join("cache-b").to_str().unwrap(),
                "--master-target",
                &mta_daemon.addr,
            ],
            &ps2,
        );
        let at_b = free_address();
        let agent_b = r.component(
            &[
                "agent",
                "--standby",
                "--listen",
                &at_b,
                "--log-dir",
                d.join("log-b").to_str().unwrap(),
                "--process-server",
                &ps2_daemon.addr,
                "--tls",
                app01b.to_str().unwrap(),
                "--name",
                "app01",
                "--mark-interval",
                "0.3",
            ],
            &app01b,
        );
        assert_eq!(agent_b.addr, at_b);
        // The two sites as the inventory describes them, for the preflight of reprotect and
        // failback: the machine and the master targets' machines, the master targets, and
        // the process servers where they answer.
        // Site B is an Azure site when its master target keeps its stores on Azure Blob.
        let site_b = match r
            .mt_args
            .iter()
            .skip_while(|a| *a != "--store-root")
            .nth(1)
            .and_then(|root| root.strip_prefix("azure://"))
        {
            Some(root) => format!(
                "kind = \"azure\"\nazure = {{ account = \"devstoreaccount1\", container = \"{}\", use_emulator = true }}",
                root.split('/').next().unwrap()
            ),
            None => "kind = \"local\"".to_string(),
        };
        let inventory = format!(
            r#"
[[site]]
name = "site-a"
kind = "local"
[[site]]
name = "site-b"
{site_b}
[[host]]
name = "host-a"
site = "site-a"
[[host]]
name = "host-b"
site = "site-b"
[[datastore]]
name = "ds-a"
host = "host-a"
type = "VMFS"
path = "{datastore_a}"
[[datastore]]
name = "ds-b"
host = "host-b"
type = "VMFS"
path = "/srv/ds-b"
[[machine]]
name = "app01"
site = "site-a"
host = "host-a"
datastore = "ds-a"
os = {{ family = "linux", version = "9.2" }}
tools = "running"
config = {{ "disk.EnableUUID" = "true" }}
controllers = [{{ name = "scsi0", kind = "lsi-logic" }}]
disks = [{{ name = "d0", size_bytes = 4194304, uuid = "6000c2-app01-d0", controller = "scsi0" }}]
{mt_vms}
[[master_target]]
name = "mta"
site = "site-a"
machine = "mta-vm"
address = "{mta_addr}"
retention = {{ path = "{retention_a}", filesystem = "ext4", capacity_bytes = 10737418240 }}
[[master_target]]
name = "mt1"
site = "site-b"
machine = "mt1-vm"
address = "{mt1_addr}"
retention = {{ path = "{retention_b}", filesystem = "ext4", capacity_bytes = 10737418240 }}
[[process_server]]
name = "ps1"
site = "site-a"
address = "{ps1_addr}"
[[process_server]]
name = "ps2"
site = "site-b"
address = "{ps2_addr}"
"#,
            datastore_a = d.join("datastore-a").display(),
            mt_vms = [("mta-vm", "site-a", "host-a"), ("mt1-vm", "site-b", "host-b")]
                .map(|(name, site, host)| format!(
                    "[[machine]]\nname = \"{name}\"\nsite = \"{site}\"\nhost = \"{host}\"\nos = {{ family = \"linux\", version = \"9.4\" }}\ntools = \"running\"\nconfig = {{ \"disk.EnableUUID\" = \"true\" }}\ncontrollers = [{{ name = \"scsi0\", kind = \"lsi-logic\" }}]\n"
                ))
                .join(""),
            mta_addr = mta_daemon.addr,
            retention_a = retention_a.display(),
            mt1_addr = r._mt.addr,
            retention_b = d.join("retention").display(),
            ps1_addr = r._ps.addr,
            ps2_addr = ps2_daemon.addr,
        );
        std::fs::write(d.join("state/inventory.toml"), inventory).unwrap();
        let (status, refreshed) = call(
            d,
            "127.0.0.1",
            &r.port,
            "POST",
            "/api/inventory/refresh",
            Some(&r.admin),
            None,
        );
        assert_eq!(status, 200, "{refreshed}");
        WayBack {
            retention_a,
            mta: Some(mta_daemon),
            mta_args,
            mta_identity: mta,
            _ps2: ps2_daemon,
            agent_b,
        }
    }

    /// Kills site A's master target (`kill -9`).
    fn kill_mt_a(&mut self) {
        if let Some(mut mt) = self.mta.take() {
            mt.signal("-KILL");
        }
    }

    /// Starts site A's master target again, at the same address, on the same volume.
    fn start_mt_a(&mut self, r: &Replicating) {
        let args: Vec<&str> = self.mta_args.iter().map(String::as_str).collect();
        self.mta = Some(r.component(&args, &self.mta_identity));
    }
}

/// Writes `pattern` at each of `offsets` (64 KiB each) through the NBD export at `url`.
fn write_64k(url: &str, offsets: &[u64], pattern: u8) {
    let mut args = vec!["-f".to_string(), "raw".into()];
    for at in offsets {
        args.extend(["-c".into(), format!("write -P {pattern} {at} 65536")]);
    }
    args.push(url.to_string());
    run(
        "qemu-io",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn the_circle_failover_commit_reprotect_failback_reprotect_moves_only_the_blocks_that_differ() {
    if !have("curl") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = Replicating::start(d);
    let mut back = WayBack::start(&r, d);
    let (retention_a, at_b) = (back.retention_a.clone(), back.agent_b.addr.clone());
    let size = 4u64 << 20;
    wait_for("app01 never became protected", 60, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        (s["state"] == "protected").then_some(s)
    });
    let at_a = format!("nbd://{}/d0", r.agent.addr);
    write_64k(&at_a, &[0, 1 << 20], 0x11);
    r.job_fails(
        &["reprotect", "app01"],
        "neither failed over nor failed back",
    );
    r.job_fails(&["failback", "app01"], "not reprotected");

    // Failover (planned): the machine runs at site B and writes there.
    let job = r.job_ok(&["failover", "app01", "--planned"]);
    assert_eq!(job["result"]["source_agent"], "app01", "{job}");
    let served = format!("nbd://{}/d0", job["result"]["address"].as_str().unwrap());
    let changed_at = [0u64, 1 << 20, (2 << 20) + 65536, 3 << 20, size - 65536];
    write_64k(&served, &changed_at, 0x22);
    r.job_fails(&["reprotect", "app01"], "not committed");
    r.job_ok(&["commit", "app01"]);

    // Reprotect: site A's disk becomes the replica; only what the machine wrote at B travels.
    // Once its preflight passed, site A's master target is lost, and the configuration
    // server is killed and started again: the job goes on from the step it was at, and
    // waits for the master target (to take the replica, or to hold the copy).
    let out = r.cli(&["reprotect", "app01", "--no-wait", "--output", "json"]);
    let id = json_out(&out)["id"].as_i64().unwrap().to_string();
    let show = |r: &Replicating| json_out(&r.cli(&["job", "show", &id, "--output", "json"]));
    let job = wait_for("the reprotect never passed its preflight", 60, || {
        let job = show(&r);
        (job["step"] != "check" || job["state"] != "running").then_some(job)
    });
    assert_eq!(job["state"], "running", "{job}");
    back.kill_mt_a();
    r.restart_server(d);
    let job = wait_for(
        "the reprotect never waited for the master target",
        60,
        || {
            let job = show(&r);
            ["adopt", "sync"]
                .contains(&job["step"].as_str().unwrap())
                .then_some(job)
        },
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    let waiting = show(&r);
    assert_eq!(
        waiting["state"], "running",
        "no master target, no reprotect: {job}"
    );
    if waiting["step"] == "adopt" {
        let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        assert!(
            status["notes"]
                .to_string()
                .contains("no agent serves them yet"),
            "{status}"
        );
    }
    back.start_mt_a(&r);
    let job = wait_for("the reprotect never ended after the restarts", 90, || {
        let job = json_out(&r.cli(&["job", "show", &id, "--output", "json"]));
        (job["state"] != "running").then_some(job)
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    let result = &job["result"];
    assert_eq!(result["agent"], "app01-b", "{job}");
    assert_eq!(result["released_agent"], "app01", "{job}");
    assert_eq!(result["master_target"], "mta", "{job}");
    assert_eq!(result["other_master_target"], "mt1", "{job}");
    let moved = received_write_bytes(&retention_a, "app01");
    let changed = changed_at.len() as u64 * 65536;
    assert!(
        (changed..=changed * 11 / 10 + size / 1000).contains(&moved),
        "reprotect moved {moved} bytes for {changed} changed of a {size}-byte disk"
    );
    let disk_a = d.join("disk.img");
    let disk_b = d.join("retention/failovers/app01/d0.img");
    // Protected means durable at the master target; its applier puts it in the disk.
    same_soon(&disk_a, &disk_b, "site A's disk is the failed-over one");
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(status["state"], "protected", "{status}");
    assert_eq!(status["agent"], "app01-b", "{status}");
    assert_eq!(status["master_targets"], json!(["mta"]), "{status}");
    // The machine at B is served by its agent there now, and replicated home.
    let at_b_url = format!("nbd://{at_b}/d0");
    write_64k(&at_b_url, &[65536, 2 << 20], 0x33);
    r.job_fails(&["reprotect", "app01"], "reprotected already");

    // Failback: the machine stops at B at a final mark and runs at home on its own disk. It
    // goes on writing at B during the failback: every write acknowledged there is at home,
    // and once stopped, B acknowledges none.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, at_b) = (stop.clone(), at_b.clone());
        std::thread::spawn(move || {
            let mut client = boomerang_testkit::RawNbd::connect(&at_b, "d0").unwrap();
            let mut acked = std::collections::BTreeMap::new();
            for i in 0..100_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (at, value) = ((i % 32) * 131072 + 8192, (i % 250) as u8 + 1);
                match client.write(i + 1, at, &[value; 4096]) {
                    Ok(0) => {
                        acked.insert(at, value);
                    }
                    // Refused: the machine is stopped here.
                    _ => break,
                }
            }
            acked
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let job = r.job_ok(&["failback", "app01"]);
    let home_lineage = job["result"]["lineage"].as_u64().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(
        !acked.is_empty(),
        "the machine wrote at B during the failback"
    );
    assert_eq!(job["result"]["agent"], "app01", "{job}");
    assert_eq!(job["result"]["drained_agent"], "app01-b", "{job}");
    let stopped_at_b = std::fs::read(&disk_b).unwrap();
    let home = std::fs::read(&disk_a).unwrap();
    assert!(home == stopped_at_b, "home holds every write made at B");
    for (at, value) in &acked {
        assert_eq!(home[*at as usize], *value, "the write acknowledged at {at}");
    }
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x33 65536 65536", &at_a],
    );
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(status["state"], "unprotected", "{status}");
    assert_eq!(status["agent"], "app01", "{status}");
    // The machine writes at home before it is protected again.
    let home_at = [3u64 << 20, (3 << 20) + 65536, 512 << 10];
    write_64k(&at_a, &home_at, 0x44);

    // Reprotect again: site B's disk becomes the replica at mt1; only what differs travels.
    // It is of the lineage the failback started at home: mt1 dropped what its incoming log
    // held of the first one, and holds only records of this one.
    let job = r.job_ok(&["reprotect", "app01"]);
    assert_eq!(job["result"]["agent"], "app01", "{job}");
    assert_eq!(job["result"]["master_target"], "mt1", "{job}");
    assert_eq!(job["result"]["lineage"], home_lineage, "{job}");
    let incoming = std::fs::read_to_string(d.join("retention/incoming/app01/lineage")).unwrap();
    assert!(
        incoming.starts_with(&format!("{home_lineage} ")),
        "{incoming}"
    );
    let moved = received_write_bytes(&d.join("retention"), "app01");
    let changed = home_at.len() as u64 * 65536;
    assert!(
        (changed..=changed * 11 / 10 + size / 1000).contains(&moved),
        "the second reprotect moved {moved} bytes for {changed} changed"
    );
    let replica = d.join("retention/replicas/app01/d0.img");
    same_soon(
        &replica,
        &disk_a,
        "the replica at site B is the machine's disk",
    );
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(status["state"], "protected", "{status}");
    assert_eq!(status["master_targets"], json!(["mt1"]), "{status}");
    drop(back);
}

#[test]
fn a_reprotect_that_would_drop_writes_made_at_the_source_after_the_point_needs_discard() {
    if !have("curl") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = Replicating::start(d);
    let back = WayBack::start(&r, d);
    wait_for("app01 never became protected", 60, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        (s["state"] == "protected").then_some(s)
    });
    // Site A is cut off from site B: its process server is gone, and the machine goes on
    // writing there; those writes never reach the master target.
    r._ps.signal("-KILL");
    let at_a = format!("nbd://{}/d0", r.agent.addr);
    write_64k(&at_a, &[2 << 20, 3 << 20], 0x55);
    // Unplanned failover to the newest point site B holds, and the machine writes there too.
    let job = r.job_ok(&["failover", "app01", "--at", "latest-processed"]);
    let served = format!("nbd://{}/d0", job["result"]["address"].as_str().unwrap());
    write_64k(&served, &[0], 0x66);
    r.job_ok(&["commit", "app01"]);
    // Both sides wrote since the split: the reprotect says so and changes nothing.
    r.job_fails(
        &["reprotect", "app01"],
        "both sides changed since the split",
    );
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(status["state"], "failed-over", "{status}");
    let kept = std::fs::read(d.join("disk.img")).unwrap();
    assert_eq!(kept[2 << 20], 0x55, "site A's writes are still there");
    // Told to, it drops them, records what it dropped, and site A's disk becomes the
    // failed-over one (compared whole, since both sides changed).
    let job = r.job_ok(&["reprotect", "app01", "--discard-unreplicated"]);
    let discarded = &job["result"]["discarded"];
    assert!(discarded["records"].as_u64().unwrap() >= 2, "{job}");
    assert!(
        job["message"].as_str().unwrap().contains("discarded"),
        "{job}"
    );
    let disk_b = d.join("retention/failovers/app01/d0.img");
    same_soon(
        &d.join("disk.img"),
        &disk_b,
        "site A's disk is the failed-over one",
    );
    // Site A's process server is back. Home again, the machine's log there goes on after the
    // records it dropped: a new lineage, from where the log is now, which the process server
    // and site B's master target take in place of what they held; reprotected again, the
    // replica at B is the machine's disk.
    r.restart_ps();
    r.job_ok(&["failback", "app01"]);
    let at_a = format!("nbd://{}/d0", r.agent.addr);
    write_64k(&at_a, &[1 << 20], 0x67);
    r.job_ok(&["reprotect", "app01"]);
    same_soon(
        &d.join("retention/replicas/app01/d0.img"),
        &d.join("disk.img"),
        "the replica at site B is the machine's disk",
    );
    drop(back);
}

#[test]
fn a_reprotect_to_an_alternate_location_copies_into_new_disks_and_keeps_the_old_ones() {
    if !have("curl") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = Replicating::start(d);
    let back = WayBack::start(&r, d);
    wait_for("app01 never became protected", 60, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        (s["state"] == "protected").then_some(s)
    });
    let job = r.job_ok(&["failover", "app01", "--planned"]);
    let served = format!("nbd://{}/d0", job["result"]["address"].as_str().unwrap());
    write_64k(&served, &[0, 1 << 20], 0x77);
    r.job_ok(&["commit", "app01"]);
    let old = std::fs::read(d.join("disk.img")).unwrap();
    // A relative directory is refused before anything happens.
    let out = r.cli(&[
        "reprotect",
        "app01",
        "--alternate-dir",
        "datastore",
        "--output",
        "json",
    ]);
    assert_ne!(out.status.code(), Some(0));
    // A datastore that site A's master target does not reach: the preflight fails, and the
    // job changes nothing.
    r.job_fails(
        &["reprotect", "app01", "--alternate", "--datastore", "ds-b"],
        "ALTERNATE_DATASTORE_UNREACHABLE",
    );
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(status["state"], "failed-over", "{status}");
    assert!(std::fs::read(d.join("disk.img")).unwrap() == old);
    // New disks in site A's datastore: a full copy; the disks the machine ran on there stay
    // as they were.
    let alternate = d.join("datastore-a");
    // Through process server ps2, named: the agent at B keeps that choice.
    let job = r.job_ok(&[
        "reprotect",
        "app01",
        "--alternate",
        "--datastore",
        "ds-a",
        "--process-server",
        "ps2",
    ]);
    assert!(
        job["message"]
            .as_str()
            .unwrap()
            .contains("alternate location"),
        "{job}"
    );
    let attached: Value =
        serde_json::from_slice(&std::fs::read(d.join("log-b/attached.json")).unwrap()).unwrap();
    assert_eq!(
        attached["process_server"],
        back._ps2.addr.as_str(),
        "{attached}"
    );
    let new_disk = alternate.join("app01-d0.img");
    let disk_b = d.join("retention/failovers/app01/d0.img");
    same_soon(&new_disk, &disk_b, "the new disk is the failed-over one");
    assert!(
        std::fs::read(d.join("disk.img")).unwrap() == old,
        "the old disk is kept"
    );
    let moved = received_write_bytes(&back.retention_a, "app01");
    assert!(
        moved >= 4 << 20,
        "a full copy of the 4 MiB disk of data: {moved}"
    );
    // Failback: the machine runs at home on its new disk.
    r.job_ok(&["failback", "app01"]);
    let at_a = format!("nbd://{}/d0", r.agent.addr);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x77 0 65536", &at_a],
    );
    assert!(std::fs::read(&new_disk).unwrap() == std::fs::read(&disk_b).unwrap());
    assert!(
        std::fs::read(d.join("disk.img")).unwrap() == old,
        "the old disk is kept"
    );
    drop(back);
}

/// fio's random 4 KiB writes, each with a crc32c verify header, over the MiB at `offset` of
/// the disk at `target` (an NBD URI, or an image file), with random seed `seed`; or, with
/// `verify_only`, the check that those blocks still hold what that run wrote.
fn fio_mib(target: &str, offset: u64, seed: u32, verify_only: bool) {
    let mut args = vec![
        "--name=circle".to_string(),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=8".into(),
        format!("--offset={offset}"),
        "--size=1M".into(),
        "--verify=crc32c".into(),
        "--verify_state_save=0".into(),
        format!("--randseed={seed}"),
    ];
    if target.starts_with("nbd://") {
        args.extend(["--ioengine=nbd".into(), format!("--uri={target}")]);
    } else {
        args.extend(["--ioengine=psync".into(), format!("--filename={target}")]);
    }
    if verify_only {
        args.push("--verify_only".into());
    }
    run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn the_whole_circle_under_a_fio_verify_workload_keeps_every_write_at_every_step() {
    if !have("curl") || !have("fio") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = Replicating::start(d);
    fio_circle(&r, d);
}

#[test]
fn the_whole_circle_with_site_b_on_azure_blob_sealed_keeps_every_write() {
    if !have("curl") || !have("fio") || !have("qemu-img") || !boomerang_testkit::azurite() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Site B's master target keeps its recovery points on Azure Blob (Azurite), sealed
    // under a key the operator holds.
    let key = d.join("site-b.key");
    boomerang(&["store", "keygen", key.to_str().unwrap()]);
    let root = format!("azure://{}/site-b", boomerang_testkit::unique("circle"));
    let r = Replicating::start_with(
        d,
        &[
            "--store-root".into(),
            root.clone(),
            "--store-key-file".into(),
            key.display().to_string(),
        ],
    );
    fio_circle(&r, d);
    assert!(!d.join("retention/replicas/app01/store").exists());
    // The replica site B had before the reprotect (lineage 0) ended: its store is deleted,
    // and so is the record of its deletion.
    let ended = format!("{root}/app01/lineage-0");
    wait_for("the ended replica's store was not deleted", 60, || {
        let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args([
                "store",
                "points",
                &ended,
                "--key-file",
                key.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let gone = String::from_utf8_lossy(&out.stderr).contains("no Boomerang store");
        let records = std::fs::read_dir(d.join("retention/retired"))
            .map(|e| {
                e.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("store-"))
                    .count()
            })
            .unwrap_or(0);
        (gone && records == 0).then_some(Value::Null)
    });
    // What site B holds is sealed: without the key, its store does not open.
    let stored = std::fs::read_to_string(d.join("retention/replicas/app01/lineage")).unwrap();
    let store = format!("{root}/app01/lineage-{}", stored.trim());
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["store", "points", &store])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sealed"));
    let verify = |key: &Path| {
        Command::new(env!("CARGO_BIN_EXE_boomerang"))
            .args([
                "store",
                "verify",
                &store,
                "--key-file",
                key.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let out = verify(&key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another key: refused, by its id.
    let other = d.join("other.key");
    boomerang(&["store", "keygen", other.to_str().unwrap()]);
    let out = verify(&other);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the key"));
    // Tampered blobs: a byte changed in each chunk of the group's namespace whose name starts
    // with 0 (a sixteenth; the replica names a thousand chunks of fio's data): verify finds
    // them, and exits 3.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tampered = runtime.block_on(async {
        use futures::TryStreamExt;
        use object_store::ObjectStoreExt;
        let shared = boomerang_store::Location::parse(&format!("{root}/.shared"))
            .unwrap()
            .open(false)
            .await
            .unwrap();
        let listed: Vec<_> = shared
            .objects
            .list(Some(&object_store::path::Path::from("chunks")))
            .try_collect()
            .await
            .unwrap();
        let mut n = 0;
        for meta in listed
            .iter()
            .filter(|m| m.location.as_ref().starts_with("chunks/0"))
        {
            let mut bytes = shared
                .objects
                .get(&meta.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x20;
            shared
                .objects
                .put(&meta.location, bytes.into())
                .await
                .unwrap();
            n += 1;
        }
        n
    });
    assert!(tampered > 0, "no chunk to tamper with");
    let out = verify(&key);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("BAD"));
}

#[test]
fn an_azure_store_answering_503_raises_an_alert_then_replication_resumes_with_every_write() {
    if !have("curl") || !have("qemu-img") || !boomerang_testkit::azurite() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Site B's master target reaches Azure Blob (Azurite) through a proxy that can answer
    // every request with an error, as a storage service does in an outage.
    let azurite = std::env::var("AZURITE_BLOB_STORAGE_URL").unwrap();
    let blob = boomerang_testkit::FaultProxy::start(
        azurite.trim_start_matches("http://").trim_end_matches('/'),
    );
    let through = format!("http://{}", blob.addr());
    let root = format!("azure://{}/site-b", boomerang_testkit::unique("outage"));
    let r = Replicating::start_full(
        d,
        &["--store-root".into(), root.clone()],
        &[("AZURITE_BLOB_STORAGE_URL", &through)],
        "",
    );
    wait_for("app01 never became protected", 60, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        (s["state"] == "protected" && s["latest_point_seq"].is_u64()).then_some(s)
    });
    let active = |kind: &str| -> Option<Value> {
        let alerts = json_out(&r.cli(&["alert", "list", "--output", "json"]));
        alerts
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["kind"] == kind && a.get("resolved_unix_ms").is_none())
            .cloned()
    };
    assert!(active("replica-failing").is_none());

    // The storage service fails every request. The machine writes on: every write is
    // acknowledged, and the master target says it makes no point.
    blob.set_http_status(Some(503));
    let mut client = boomerang_testkit::RawNbd::connect(&r.agent.addr, "d0").unwrap();
    for i in 0..64u64 {
        let block = vec![(i % 13) as u8 + 0x21; 4096];
        assert_eq!(client.write(i + 1, i * 3 * 4096, &block).unwrap(), 0);
    }
    let alert = wait_for("no alert while the store answered 503", 90, || {
        active("replica-failing")
    });
    assert_eq!(alert["object"], "machine/app01/replica-on/mt1", "{alert}");
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains("mt1") && message.contains(&root) && message.contains("503"),
        "{alert}"
    );
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_ne!(status["health"], "healthy", "{status}");
    assert!(
        status["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("no recovery point")),
        "{status}"
    );

    // The service is back: points resume, the alert resolves, and the newest point holds
    // every write made during the outage.
    let mark = mark_now(&d.join("log"));
    blob.set_http_status(None);
    wait_for(
        "the alert did not resolve once the store answered",
        90,
        || active("replica-failing").is_none().then_some(Value::Null),
    );
    let point = wait_for("no point after the outage", 60, || {
        listed_points(d)?
            .iter()
            .find(|p| p["seq"].as_u64().is_some_and(|s| s >= mark))
            .cloned()
    });
    let seq = point["seq"].as_u64().unwrap().to_string();
    let out = d.join("after.img");
    let exported = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["master-target", "export"])
        .arg(d.join("retention"))
        .args(["--machine", "app01", "--disk", "d0", "--at", &seq, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(d.join("disk.img")).unwrap(),
        "the point after the outage is not the disk"
    );

    // A failover at this Azure site gives what Azure boots, a fixed VHD, and serves the
    // disk at once (instant recovery): both are the disk.
    let job = r.job_ok(&["failover", "app01", "--planned"]);
    let file = job["result"]["materialized"][0]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("nothing materialized: {job}"));
    assert!(file.ends_with(".vhd"), "{job}");
    // (A fixed VHD has its footer at the end only: qemu-img is told the format.)
    let info: Value = serde_json::from_str(&run(
        "qemu-img",
        &["info", "-f", "vpc", "--output", "json", file],
    ))
    .unwrap();
    assert_eq!(info["format"], "vpc", "{info}");
    assert_eq!(info["virtual-size"], 4 << 20, "{info}");
    let served = format!("nbd://{}/d0", job["result"]["address"].as_str().unwrap());
    run(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", file, &served],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            d.join("disk.img").to_str().unwrap(),
            &served,
        ],
    );
}

#[test]
fn a_protect_to_an_azure_store_that_refuses_the_credentials_fails_and_says_so() {
    if !have("curl") || !boomerang_testkit::azurite() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Site B's master target holds a key that is not the storage account's.
    let wrong =
        "bm90IHRoZSBrZXkgb2YgZGV2c3RvcmVhY2NvdW50MSwgbWFkZSB1cCBmb3IgYSB0ZXN0IG9mIGl0LCA2NCBiIQ==";
    let root = format!("azure://{}/site-b", boomerang_testkit::unique("refused"));
    let r = Replicating::start_full(
        d,
        &["--store-root".into(), root.clone()],
        &[("AZURE_STORAGE_ACCOUNT_KEY", wrong)],
        "",
    );
    r.gold_policy();
    // The protect fails: the copy reaches the master target, but no point can be made.
    let job = r.job_fails(
        &["protect", "app01", "--policy", "gold"],
        "cannot keep the recovery points of \"app01\"",
    );
    let message = job["message"].as_str().unwrap();
    assert!(
        message.contains("credentials") && message.contains("mt1"),
        "{message}"
    );
    assert!(!message.contains(wrong), "the key is never shown");
    // And the machine has an alert that says why.
    let alerts = json_out(&r.cli(&["alert", "list", "--output", "json"]));
    let alert = alerts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "replica-failing")
        .unwrap_or_else(|| panic!("no replica-failing alert: {alerts}"));
    assert!(
        alert["message"].as_str().unwrap().contains("credentials"),
        "{alert}"
    );
}

/// The acceptance circle on `r` under fio: protect, test failover and its cleanup, planned
/// failover (materialized as qcow2), commit, reprotect, failback and reprotect again, every
/// write fio made verified at each step.
fn fio_circle(r: &Replicating, d: &Path) {
    let back = WayBack::start(r, d);
    let at_a = format!("nbd://{}/d0", r.agent.addr);
    let at_b = format!("nbd://{}/d0", back.agent_b.addr);
    // Each run of fio writes (and verifies) a MiB of its own: (offset, seed).
    let mut written: Vec<(u64, u32)> = Vec::new();
    let verify_all = |target: &str, written: &[(u64, u32)]| {
        for (offset, seed) in written {
            fio_mib(target, *offset, *seed, true);
        }
    };

    // Protect: the protect job follows the initial copy to its end.
    r.gold_policy();
    r.job_ok(&["protect", "app01", "--policy", "gold"]);
    fio_mib(&at_a, 0, 1, false);
    written.push((0, 1));

    // Test failover at the latest point, once a mark after fio's writes is one: they are all
    // there; then its cleanup.
    let after_fio = mark_now(&d.join("log"));
    wait_for("the mark after fio never became a point", 30, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        (s["latest_point_seq"].as_u64()? >= after_fio).then_some(s)
    });
    let job = r.job_ok(&["test-failover", "app01"]);
    let tested = format!("nbd://{}/d0", job["result"]["address"].as_str().unwrap());
    verify_all(&tested, &written);
    r.job_ok(&["test-failover", "app01", "--cleanup"]);

    // Planned failover: everything acknowledged at site A is served at site B.
    fio_mib(&at_a, 1 << 20, 2, false);
    written.push((1 << 20, 2));
    // Also materialized there, as qcow2: the disk at the point, as served.
    let job = r.job_ok(&["failover", "app01", "--planned", "--format", "qcow2"]);
    let served = format!("nbd://{}/d0", job["result"]["address"].as_str().unwrap());
    verify_all(&served, &written);
    let materialized = &job["result"]["materialized"][0];
    let file = materialized["path"].as_str().unwrap();
    assert!(
        file.ends_with(&format!("d0-at-{}.qcow2", job["result"]["seq"])),
        "{job}"
    );
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", file, &served],
    );
    fio_mib(&served, 2 << 20, 3, false);
    written.push((2 << 20, 3));
    r.job_ok(&["commit", "app01"]);

    // Reprotect: the agent at B serves the disk; the machine writes there.
    r.job_ok(&["reprotect", "app01"]);
    verify_all(&at_b, &written);
    fio_mib(&at_b, 3 << 20, 4, false);
    written.push((3 << 20, 4));

    // The machine's agent at B reaches the process server there, as the preflight of the
    // failback sees it.
    let network = |r: &Replicating| -> Value {
        let out = r.cli(&[
            "preflight",
            "app01",
            "--for",
            "failback",
            "--output",
            "json",
        ]);
        json_out(&out)["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["code"] == "PS_MACHINE_NETWORK")
            .cloned()
            .unwrap()
    };
    let check = network(r);
    assert_eq!(check["passed"], true, "{check}");
    // Failback: home, with every write of both sites.
    r.job_ok(&["failback", "app01"]);
    verify_all(&at_a, &written);

    // Reprotect again: the replica at site B is the machine's disk, every write in it.
    r.job_ok(&["reprotect", "app01"]);
    let replica = d.join("retention/replicas/app01/d0.img");
    same_soon(
        &replica,
        &d.join("disk.img"),
        "the replica at B is the disk",
    );
    verify_all(replica.to_str().unwrap(), &written);
    let status = json_out(&r.cli(&["status", "app01", "--output", "json"]));
    assert_eq!(status["state"], "protected", "{status}");
    drop(back);
}

/// Azurite's well-known development account key.
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[test]
fn preflight_lists_an_azure_sites_container_with_its_credentials() {
    if !have("curl") || !boomerang_testkit::azurite() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The site's container exists (made through the store, with the emulator's account).
    let container = boomerang_testkit::unique("preflight");
    boomerang(&["store", "init", &format!("azure://{container}/probe")]);
    let url = std::env::var("AZURITE_BLOB_STORAGE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:10000".into());
    let key = d.join("azure.key");
    let inventory = |container: &str| {
        format!(
            r#"
[[site]]
name = "site-a"
kind = "local"
[[site]]
name = "site-b"
kind = "azure"
azure = {{ account = "devstoreaccount1", container = "{container}", endpoint = "{url}/devstoreaccount1", key_file = "{key}" }}
[[machine]]
name = "web01"
site = "site-b"
os = {{ family = "linux", version = "9.2" }}
tools = "running"
disks = [{{ name = "sda", size_bytes = 1024, uuid = "u-1" }}]
[[machine]]
name = "mt-vm"
site = "site-a"
os = {{ family = "linux", version = "9.4" }}
tools = "running"
[[master_target]]
name = "mt1"
site = "site-a"
machine = "mt-vm"
address = "127.0.0.1:1"
retention = {{ path = "/mnt/retention", filesystem = "ext4", capacity_bytes = 1000000 }}
"#,
            key = key.display()
        )
    };
    let (daemon, admin) = server_with(d, |state| {
        with_inventory(state, &inventory(&container), &[])
    });
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let azure_check = || {
        let (status, report) = call(
            d,
            "127.0.0.1",
            &port,
            "GET",
            "/api/machines/web01/preflight?for=failback",
            Some(&admin),
            None,
        );
        assert_eq!(status, 200, "{report}");
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["code"] == "AZURE_STORAGE")
            .cloned()
            .unwrap_or_else(|| panic!("no AZURE_STORAGE check: {report}"))
    };
    // The right key: the container answers.
    std::fs::write(&key, format!("{AZURITE_KEY}\n")).unwrap();
    let check = azure_check();
    assert_eq!(check["passed"], true, "{check}");
    // A wrong key: refused, and said so (never the key itself).
    let wrong = "d3Jvbmcga2V5IGZvciB0aGUgYWNjb3VudCwgbm90IGl0cyBvd24ga2V5IGF0IGFsbC4uLi4uLi4uLi4=";
    std::fs::write(&key, wrong).unwrap();
    let check = azure_check();
    let message = check["message"].as_str().unwrap();
    assert_eq!(check["passed"], false, "{check}");
    assert_eq!(check["severity"], "error", "{check}");
    assert!(message.contains("rejected the credentials"), "{message}");
    assert!(!message.contains(wrong), "{message}");
    // A container that is not there.
    std::fs::write(&key, AZURITE_KEY).unwrap();
    std::fs::write(
        d.join("state/inventory.toml"),
        inventory("no-such-container"),
    )
    .unwrap();
    let (status, refreshed) = call(
        d,
        "127.0.0.1",
        &port,
        "POST",
        "/api/inventory/refresh",
        Some(&admin),
        None,
    );
    assert_eq!(status, 200, "{refreshed}");
    let check = azure_check();
    assert_eq!(check["passed"], false, "{check}");
    assert!(
        check["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{check}"
    );
    // The site's settings show where the key is, never the key.
    let (_, sites) = call(
        d,
        "127.0.0.1",
        &port,
        "GET",
        "/api/sites",
        Some(&admin),
        None,
    );
    assert!(sites.to_string().contains("key_file"), "{sites}");
    assert!(!sites.to_string().contains(AZURITE_KEY), "{sites}");
}

/// A backup key made in `d`, the place of the backups at the other site, and the server.toml
/// section that backs the server up there every second, the newest two kept.
fn backup_settings(d: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let key = d.join("backup.key");
    boomerang(&["store", "keygen", key.to_str().unwrap()]);
    let backups = d.join("site-b-backups");
    let settings = format!(
        "\n[backup]\nlocation = \"{}\"\nkey_file = \"{}\"\nevery_seconds = 1\nkeep = 2\n",
        backups.display(),
        key.display()
    );
    (key, backups, settings)
}

#[test]
fn a_restored_server_lists_the_same_recovery_points_and_its_components_report_to_it() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (key, backups, settings) = backup_settings(d);
    let mut r = Replicating::start_full(d, &[], &[], &settings);
    r.gold_policy();
    r.job_ok(&["protect", "app01", "--policy", "gold"]);
    wait_for("no point listed", 30, || {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        s["latest_point_seq"].as_u64().map(|_| s)
    });
    // The machine stops (its agent ends): its points stay as they are.
    r.agent.signal("-KILL");
    let points = |r: &Replicating| -> Value {
        let s = json_out(&r.cli(&["status", "app01", "--output", "json"]));
        json!({
            "latest_point_seq": s["latest_point_seq"],
            "disks": s["disks"].as_array().unwrap().iter()
                .map(|d| json!([d["name"], d["points"]]))
                .collect::<Vec<_>>(),
        })
    };
    let mut before = points(&r);
    wait_for("the points never settled", 30, || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = points(&r);
        let settled = now == before;
        before = now;
        settled.then_some(Value::Null)
    });
    assert!(before["latest_point_seq"].as_u64().unwrap() > 0, "{before}");
    assert!(before["disks"][0][1].as_u64().unwrap() > 0, "{before}");
    let lists = |r: &Replicating| -> Vec<Value> {
        ["site", "machine", "policy"]
            .iter()
            .map(|what| json_out(&r.cli(&[what, "list", "--output", "json"])))
            .collect()
    };
    let listed = lists(&r);
    // Two backups later (one a second), the site with the server is lost.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    r._server.signal("-KILL");
    let restored = d.join("restored");
    boomerang(&[
        "server",
        "restore",
        "--from",
        backups.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--state",
        restored.to_str().unwrap(),
    ]);
    // Started where the components reach it, the rebuilt server lists what the lost one did.
    let listen = format!("127.0.0.1:{}", r.port);
    r._server = Daemon::start(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "server",
            "--config",
            restored.join("server.toml").to_str().unwrap(),
            "--listen",
            &listen,
        ],
    );
    assert_eq!(points(&r), before);
    assert_eq!(lists(&r), listed);
    // The master target reports to it with the credentials it had.
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    wait_for(
        "the master target never reported to the restored server",
        30,
        || {
            let c = json_out(&r.cli(&["component", "show", "mt1", "--output", "json"]));
            (c["last_heartbeat_unix_ms"].as_i64()? > restarted).then_some(c)
        },
    );
    assert_eq!(points(&r), before);
}

#[test]
fn a_server_backed_up_to_the_other_site_is_restored_with_its_sites_machines_and_policies() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (key, backups, settings) = backup_settings(d);
    let (daemon, admin) = server_with(d, |state| {
        with_inventory(state, INVENTORY, &[]);
        let config = state.join("server.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, text + &settings).unwrap();
    });
    let port = daemon.addr.rsplit_once(':').unwrap().1.to_string();
    let get = |port: &str, path: &str| call(d, "127.0.0.1", port, "GET", path, Some(&admin), None);
    let (status, made) = call(
        d,
        "127.0.0.1",
        &port,
        "POST",
        "/api/policies",
        Some(&admin),
        Some(
            &json!({"name": "gold", "rpo_threshold_seconds": 30, "retention_seconds": 3600, "app_consistent_seconds": 0}),
        ),
    );
    assert_eq!(status, 201, "{made}");
    let before: Vec<Value> = ["/api/sites", "/api/machines", "/api/policies"]
        .iter()
        .map(|p| get(&port, p).1)
        .collect();
    // Backups come every second, the newest two kept, sealed: nothing in them reads as text.
    let listed = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(backups.join("server-backups"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "backup"))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for("no backup after the policy was made", 30, || {
        (listed().len() >= 2).then_some(Value::Null)
    });
    // Both kept backups are from after the policy (one a second).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // The site is lost; a server is rebuilt at the other site from its backups.
    drop(daemon);
    assert!(listed().len() <= 2, "{:?}", listed());
    let newest = listed().into_iter().max().unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    assert!(
        !bytes.windows(4).any(|w| w == b"gold"),
        "the backup is sealed"
    );
    let restored = d.join("restored");
    // A place with no backup: said so, and nothing is made.
    let empty = d.join("no-backups");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["server", "restore", "--from", empty.to_str().unwrap()])
        .args(["--key-file", key.to_str().unwrap()])
        .args(["--state", restored.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no server backup"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!restored.join("server.toml").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["server", "restore", "--from", backups.to_str().unwrap()])
        .args(["--state", restored.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a sealed backup needs its key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key-file"));
    // The newest backup is damaged: the one before it is restored.
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    std::fs::write(&newest, damaged).unwrap();
    let out: Value = serde_json::from_str(&boomerang(&[
        "server",
        "restore",
        "--from",
        backups.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--state",
        restored.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    let name = newest.file_name().unwrap().to_str().unwrap();
    assert!(
        !out["backup"].as_str().unwrap().ends_with(name),
        "the damaged backup was passed over: {out}"
    );
    let again = Daemon::start(
        env!("CARGO_BIN_EXE_boomerang"),
        &[
            "server",
            "--config",
            restored.join("server.toml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let port2 = again.addr.rsplit_once(':').unwrap().1.to_string();
    // The CA's state came back too: the restored server can enrol components.
    assert!(restored.join("ca.json").exists() && restored.join("ca.key").exists());
    // The same CA and certificate (the test's client trusts state/ca.crt), the same token.
    let after: Vec<Value> = ["/api/sites", "/api/machines", "/api/policies"]
        .iter()
        .map(|p| get(&port2, p).1)
        .collect();
    assert_eq!(after, before);
    // Restoring over a server is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_boomerang"))
        .args(["server", "restore", "--from", backups.to_str().unwrap()])
        .args(["--key-file", key.to_str().unwrap()])
        .args(["--state", restored.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"));
}
