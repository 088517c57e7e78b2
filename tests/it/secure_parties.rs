//! `brelu secure party` processes: a session over 127.0.0.1 with pinned keys gives the same
//! predictions as `secure run`; a wrong key, a racing impostor, a different spec, a killed or
//! stalled party each end the session with a named error, and nothing hangs.
use crate::common;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// One `brelu secure party` process with its stdout and stderr collected by threads.
struct PartyProc {
    child: std::process::Child,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The session's key folder, kept while the process runs.
    _keys: Option<std::sync::Arc<tempfile::TempDir>>,
}

fn collect(
    mut pipe: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

impl PartyProc {
    /// Starts `brelu secure party --role ROLE` on the small test model with `args`.
    fn spawn(role: &str, images: usize, timeout: f64, args: &[String]) -> PartyProc {
        let mut child = std::process::Command::new(common::brelu_exe())
            .args([
                "secure",
                "party",
                "--role",
                role,
                "--model",
                "resnet18-cifar-light",
                "--input",
                "1,16,16",
                "--classes",
                "10",
                "--images",
                &images.to_string(),
                "--timeout",
                &timeout.to_string(),
            ])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        PartyProc {
            stdout: collect(child.stdout.take().unwrap()),
            stderr: collect(child.stderr.take().unwrap()),
            child,
            _keys: None,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits for the process to exit within `limit`; returns whether it succeeded.
    fn wait_within(&mut self, limit: Duration) -> bool {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // let the readers drain
                return status.success();
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("party still running after {limit:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `brelu secure keygen --role all -o DIR`.
fn keygen(dir: &Path) {
    let (ok, _, err) = common::brelu(&[
        "secure",
        "keygen",
        "--role",
        "all",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
}

fn keys_arg(dir: &Path) -> Vec<String> {
    vec!["--keys".into(), dir.to_str().unwrap().into()]
}

/// Arguments of the three roles for a session on the given ports.
fn role_args(pc: u16, ps: u16) -> [Vec<String>; 3] {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    [
        s(&["--listen", &format!("127.0.0.1:{pc}")]),
        s(&[
            "--listen",
            &format!("127.0.0.1:{ps}"),
            "--peer",
            &format!("client=127.0.0.1:{pc}"),
            "--random-weights",
        ]),
        s(&[
            "--peer",
            &format!("client=127.0.0.1:{pc}"),
            "--peer",
            &format!("server=127.0.0.1:{ps}"),
        ]),
    ]
}

fn wait_for(p: &PartyProc, what: &str, limit: Duration) {
    let t = Instant::now();
    while !p.stderr().contains(what) {
        assert!(t.elapsed() < limit, "no '{what}': {}", p.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the three `brelu secure party` processes of one session and waits until the client
/// has finished the handshake.
fn spawn_parties(images: usize, timeout: f64) -> Vec<PartyProc> {
    spawn_parties_with(images, timeout, [&[], &[], &[]], true)
}

/// Like [`spawn_parties`], with extra arguments per role (client, server, dealer).
fn spawn_parties_with(
    images: usize,
    timeout: f64,
    extra_args: [&[&str]; 3],
    wait_started: bool,
) -> Vec<PartyProc> {
    let keys = std::sync::Arc::new(tempfile::tempdir().unwrap());
    keygen(keys.path());
    let args = role_args(common::free_port(), common::free_port());
    let mut ps: Vec<PartyProc> = ["client", "server", "dealer"]
        .iter()
        .enumerate()
        .map(|(i, role)| {
            let mut a = args[i].clone();
            a.extend(keys_arg(keys.path()));
            a.extend(extra_args[i].iter().map(|s| s.to_string()));
            PartyProc::spawn(role, images, timeout, &a)
        })
        .collect();
    ps[0]._keys = Some(keys);
    if wait_started {
        wait_for(&ps[0], "session started", Duration::from_secs(60));
    }
    ps
}

#[test]
fn party_processes_complete_a_session() {
    let mut ps = spawn_parties(2, 60.0);
    for p in ps.iter_mut() {
        assert!(p.wait_within(Duration::from_secs(90)), "{}", p.stderr());
    }
}

#[test]
fn parties_with_different_specs_refuse_the_session() {
    // The server runs the same architecture with a block-ReLU spec the others do not have.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    let st = std::process::Command::new(common::brelu_exe())
        .args([
            "spec",
            "uniform",
            "--model",
            "resnet18-cifar-light",
            "--input",
            "1,16,16",
            "--patch",
            "2x2",
            "-o",
        ])
        .arg(&spec)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let spec = spec.to_str().unwrap();
    // A party whose peers already gave up dials them until its connect timeout: keep that
    // short, so every party has ended well within the wait below.
    let ct: &[&str] = &["--connect-timeout", "10"];
    let server: &[&str] = &["--spec", spec, "--connect-timeout", "10"];
    let mut ps = spawn_parties_with(1, 20.0, [ct, server, ct], false);
    for (i, p) in ps.iter_mut().enumerate() {
        let ok = p.wait_within(Duration::from_secs(60));
        let err = p.stderr();
        assert!(!ok, "party {i} should refuse");
        assert!(
            // A party that dials a peer which already gave up sees its connection refused.
            [
                "different model/spec",
                "closed",
                "reset",
                "refused",
                "never connected"
            ]
            .iter()
            .any(|m| err.contains(m)),
            "party {i}: {err}"
        );
    }
    assert!(
        ps[1].stderr().contains("different model/spec"),
        "{}",
        ps[1].stderr()
    );
}

#[test]
fn killing_a_party_mid_inference_stops_the_others() {
    // Each role in turn; many images, so the session is still running at the kill.
    let timeout = 20.0;
    for victim in [1usize, 0, 2] {
        let mut ps = spawn_parties(100_000, timeout);
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            ps[victim].child.try_wait().unwrap().is_none(),
            "party {victim} ended early"
        );
        ps[victim].child.kill().unwrap();
        let _ = ps[victim].child.wait();
        // A closed connection is seen at once; the bound is the timeout plus slack.
        for i in (0..3).filter(|&i| i != victim) {
            let ok = ps[i].wait_within(Duration::from_secs_f64(timeout + 10.0));
            let err = ps[i].stderr();
            assert!(!ok, "party {i} should fail when {victim} is killed");
            // Each sees the victim's end, or the end of the other survivor when that one gave
            // up first.
            assert!(
                err.contains("closed") || err.contains("reset"),
                "party {i} (killed {victim}): {err}"
            );
        }
    }
}

#[test]
fn a_stalled_party_times_the_others_out() {
    let mut ps = spawn_parties(100_000, 3.0);
    std::thread::sleep(Duration::from_secs(1));
    let pid = ps[2].child.id().to_string();
    // Stop (not kill) the dealer: its sockets stay open but nothing more arrives.
    let st = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    for i in [0, 1] {
        let ok = ps[i].wait_within(Duration::from_secs(20));
        let err = ps[i].stderr();
        assert!(!ok, "party {i} should fail");
        assert!(
            err.contains("timeout") || err.contains("closed") || err.contains("reset"),
            "party {i}: {err}"
        );
    }
    let _ = ps[2].child.kill();
    let _ = ps[2].child.wait();
}

/// Three processes with pinned keys give the predictions `secure run` gives (same model, seed
/// and images) and which the plaintext fixed-point model gives.
#[test]
fn pinned_key_session_matches_secure_run() {
    let mut ps = spawn_parties_with(2, 60.0, [&["--json"], &[], &[]], false);
    for p in ps.iter_mut() {
        assert!(p.wait_within(Duration::from_secs(90)), "{}", p.stderr());
    }
    let party: serde_json::Value = serde_json::from_str(&ps[0].stdout()).unwrap();
    let (ok, out, err) = common::brelu(&[
        "secure",
        "run",
        "--model",
        "resnet18-cifar-light",
        "--input",
        "1,16,16",
        "--classes",
        "10",
        "--images",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    for i in 0..2 {
        let logits: Vec<f64> = party["images"][i]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(logits.len(), 10);
        let argmax = (0..10)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        assert_eq!(
            argmax as u64,
            run["images"][i]["prediction"].as_u64().unwrap()
        );
        assert_eq!(
            argmax as u64,
            run["images"][i]["plaintext_prediction"].as_u64().unwrap()
        );
    }
}

/// A client that pins a key which is not the dealer's refuses the real dealer, names it, and
/// the session ends on every side.
#[test]
fn a_wrong_pinned_key_ends_the_session_by_name() {
    let (real, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    keygen(real.path());
    keygen(other.path());
    let args = role_args(common::free_port(), common::free_port());
    let f = |d: &tempfile::TempDir, name: &str| d.path().join(name).to_str().unwrap().to_string();
    let mut client_args = args[0].clone();
    client_args.extend([
        "--key".into(),
        f(&real, "client.key"),
        "--peer-key".into(),
        format!("server={}", f(&real, "server.pub")),
        "--peer-key".into(),
        format!("dealer={}", f(&other, "dealer.pub")),
    ]);
    let with_keys = |i: usize| {
        let mut a = args[i].clone();
        a.extend(keys_arg(real.path()));
        a.extend(["--connect-timeout".to_string(), "5".to_string()]);
        a
    };
    client_args.extend(["--connect-timeout".to_string(), "5".to_string()]);
    let mut ps = [
        PartyProc::spawn("client", 1, 5.0, &client_args),
        PartyProc::spawn("server", 1, 5.0, &with_keys(1)),
        PartyProc::spawn("dealer", 1, 5.0, &with_keys(2)),
    ];
    for (i, p) in ps.iter_mut().enumerate() {
        assert!(
            !p.wait_within(Duration::from_secs(40)),
            "party {i} should fail"
        );
    }
    let c = ps[0].stderr();
    assert!(
        c.contains("refused dealer") && c.contains("pinned dealer key"),
        "{c}"
    );
    let d = ps[2].stderr();
    assert!(
        d.contains("refused client") && d.contains("closed the connection"),
        "{d}"
    );
}

/// A TCP relay to `target` that counts the bytes flowing back to whoever connects to it.
fn counting_proxy(target: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let back = std::sync::Arc::new(AtomicU64::new(0));
    let count = back.clone();
    std::thread::spawn(move || {
        let Ok((inbound, _)) = l.accept() else { return };
        // The target may not listen yet (it loads its model first).
        let t = Instant::now();
        let outbound = loop {
            match TcpStream::connect(("127.0.0.1", target)) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(_) => return,
            }
        };
        let (mut i2, mut o2) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut i2, &mut o2);
            let _ = o2.shutdown(std::net::Shutdown::Write);
        });
        let (mut o, mut i) = (outbound, inbound);
        let mut buf = [0u8; 4096];
        use std::io::{Read, Write};
        while let Ok(n) = o.read(&mut buf) {
            if n == 0 || i.write_all(&buf[..n]).is_err() {
                break;
            }
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = i.shutdown(std::net::Shutdown::Both);
        let _ = up.join();
    });
    (port, back)
}

/// A fourth process races for the dealer's role with its own key (it knows the others'
/// public keys). The client refuses it by name, it receives not one byte, and the real dealer
/// then joins and the session completes.
#[test]
fn an_impostor_racing_for_a_role_gets_nothing() {
    let (real, own) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    keygen(real.path());
    keygen(own.path());
    let (pc, ps_port) = (common::free_port(), common::free_port());
    let args = role_args(pc, ps_port);
    let with_keys = |i: usize| {
        let mut a = args[i].clone();
        a.extend(keys_arg(real.path()));
        a
    };
    let mut client = PartyProc::spawn("client", 1, 60.0, &with_keys(0));
    let mut server = PartyProc::spawn("server", 1, 60.0, &with_keys(1));
    let (proxy, back) = counting_proxy(pc);
    let p = |d: &tempfile::TempDir, name: &str| d.path().join(name).to_str().unwrap().to_string();
    let impostor_args: Vec<String> = vec![
        "--peer".into(),
        format!("client=127.0.0.1:{proxy}"),
        "--peer".into(),
        format!("server=127.0.0.1:{ps_port}"),
        "--key".into(),
        p(&own, "dealer.key"),
        "--peer-key".into(),
        format!("client={}", p(&real, "client.pub")),
        "--peer-key".into(),
        format!("server={}", p(&real, "server.pub")),
    ];
    let mut impostor = PartyProc::spawn("dealer", 1, 10.0, &impostor_args);
    assert!(
        !impostor.wait_within(Duration::from_secs(40)),
        "the impostor must fail"
    );
    let i = impostor.stderr();
    assert!(
        i.contains("refused client") && i.contains("closed the connection"),
        "{i}"
    );
    wait_for(&client, "refused dealer", Duration::from_secs(10));
    assert!(
        client
            .stderr()
            .contains("does not hold the pinned dealer key"),
        "{}",
        client.stderr()
    );
    let mut dealer = PartyProc::spawn("dealer", 1, 60.0, &with_keys(2));
    for p in [&mut client, &mut server, &mut dealer] {
        assert!(p.wait_within(Duration::from_secs(90)), "{}", p.stderr());
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        back.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the impostor received bytes"
    );
}

#[test]
fn keygen_and_key_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    // Keys are identities: never replaced silently.
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = common::brelu(&["secure", "keygen", "--role", "client", "-o", d]);
    assert!(!ok && err.contains("--force"), "{err}");
    let key = dir.path().join("client.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the private key must be readable by its owner only"
    );
    let run = |args: &[&str]| {
        let mut all = vec![
            "secure",
            "party",
            "--model",
            "resnet18-cifar-light",
            "--input",
            "1,16,16",
        ];
        all.extend(args);
        let (ok, _, err) = common::brelu(&all);
        assert!(!ok);
        err
    };
    let pubkey = format!("{d}/server.pub");
    // No key at all; a public key given as the own key; a key of the wrong role; a missing pin.
    assert!(run(&["--role", "client"]).contains("--key"));
    let e = run(&["--role", "server", "--random-weights", "--key", &pubkey]);
    assert!(e.contains("server.pub") && e.contains("private"), "{e}");
    let e = run(&["--role", "client", "--key", &format!("{d}/dealer.key")]);
    assert!(e.contains("dealer's") && e.contains("client"), "{e}");
    let e = run(&[
        "--role",
        "client",
        "--key",
        &format!("{d}/client.key"),
        "--peer-key",
        &format!("server={pubkey}"),
    ]);
    assert!(e.contains("--peer-key dealer"), "{e}");
    let e = run(&[
        "--role",
        "client",
        "--key",
        &format!("{d}/client.key"),
        "--peer-key",
        &format!("dealer={pubkey}"),
    ]);
    assert!(e.contains("server's") && e.contains("dealer"), "{e}");
    // The server does not silently invent weights.
    let e = run(&["--role", "server", "--keys", d]);
    assert!(e.contains("--weights"), "{e}");

    // Key hygiene. A private key others may read or write is refused.
    let client_key = format!("{d}/client.key");
    let pins = [
        "--peer-key",
        &format!("server={d}/server.pub"),
        "--peer-key",
        &format!("dealer={d}/dealer.pub"),
    ];
    let with_key = |key: &str| -> Vec<String> {
        ["--role", "client", "--key", key]
            .iter()
            .chain(pins.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let args = with_key(&client_key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for bad in [0o644, 0o660, 0o606] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(bad)).unwrap();
        let e = run(&args);
        assert!(
            e.contains("client.key") && e.contains("chmod 600"),
            "{bad:o}: {e}"
        );
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A key file whose public key is not its private key's (here: the server's).
    let text = std::fs::read_to_string(&key).unwrap();
    let server_pub = std::fs::read_to_string(dir.path().join("server.pub")).unwrap();
    let field = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("public"))
            .unwrap()
            .to_string()
    };
    let mixed = dir.path().join("mixed.key");
    brelu::fs::write_atomic_private(
        &mixed,
        text.replace(&field(&text), &field(&server_pub)).as_bytes(),
    )
    .unwrap();
    let args = with_key(mixed.to_str().unwrap());
    let e = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("mixed.key") && e.contains("not the public key"),
        "{e}"
    );
    // A server and a dealer with one key pair: the dealer's pin carries the server's key.
    let twin = dir.path().join("twin-dealer.pub");
    std::fs::write(
        &twin,
        server_pub.replace("role = \"server\"", "role = \"dealer\""),
    )
    .unwrap();
    let e = run(&[
        "--role",
        "client",
        "--key",
        &client_key,
        "--peer-key",
        &format!("server={d}/server.pub"),
        "--peer-key",
        &format!("dealer={}", twin.display()),
    ]);
    assert!(
        e.contains("the server and the dealer have the same key"),
        "{e}"
    );
}

/// The server's `--argmax-only` is the session's policy, not the client's choice: a client
/// that does not agree is refused at the handshake, before any image data flows.
#[test]
fn the_servers_argmax_only_policy_binds_the_client() {
    let ct: &[&str] = &["--connect-timeout", "10"];
    let server: &[&str] = &["--argmax-only", "--connect-timeout", "10"];
    let mut ps = spawn_parties_with(1, 20.0, [ct, server, ct], false);
    for (i, p) in ps.iter_mut().enumerate() {
        assert!(
            !p.wait_within(Duration::from_secs(60)),
            "party {i} should refuse"
        );
    }
    let err = ps[1].stderr();
    assert!(
        err.contains("different model/spec/settings or policy") && err.contains("--argmax-only"),
        "{err}"
    );
}

/// A peer that never completes the TCP handshake (here a listener whose accept queue is full,
/// so the kernel drops the SYNs, as a firewall would) costs a dialling party its connect
/// timeout, not the kernel's minutes of SYN retries.
#[test]
fn dialling_a_silent_host_ends_at_the_connect_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Fill the accept queue until a connection attempt hangs.
    let mut held = Vec::new();
    let mut silent = false;
    for _ in 0..4096 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => {
                silent = true;
                break;
            }
        }
    }
    if !silent {
        eprintln!("the kernel kept accepting connections: nothing to test here");
        return;
    }
    let t0 = Instant::now();
    let e = brelu::secure::join::connect_retry(&addr.to_string(), "server", Duration::from_secs(1))
        .unwrap_err();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    assert!(e.to_string().contains("server at 127.0.0.1"), "{e}");
    drop(l);
}

/// The server's `--max-queries` counts the pinned client key's images across sessions in its
/// state file: the image over the budget is refused by the server, naming it, and a later
/// session is refused before it starts.
#[test]
fn the_servers_query_budget_holds_across_sessions() {
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path());
    let state = keys.path().join("queries.json");
    let session = |images: usize| -> Vec<PartyProc> {
        let args = role_args(common::free_port(), common::free_port());
        ["client", "server", "dealer"]
            .iter()
            .enumerate()
            .map(|(i, role)| {
                let mut a = args[i].clone();
                a.extend(keys_arg(keys.path()));
                a.extend(["--connect-timeout".into(), "10".into()]);
                if i == 1 {
                    a.extend(["--max-queries", "3", "--query-state"].map(String::from));
                    a.push(state.to_str().unwrap().into());
                }
                PartyProc::spawn(role, images, 20.0, &a)
            })
            .collect()
    };
    for mut p in session(2) {
        assert!(p.wait_within(Duration::from_secs(60)), "{}", p.stderr());
    }
    // Two more: the third image is served, the fourth refused.
    let mut ps = session(2);
    let ok: Vec<bool> = ps
        .iter_mut()
        .map(|p| p.wait_within(Duration::from_secs(60)))
        .collect();
    assert!(!ok[1], "the server served past its budget");
    let err = ps[1].stderr();
    assert!(
        err.contains("budget is spent") && err.contains("3"),
        "{err}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let counts: Vec<u64> = st["clients"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![3], "{st}");
    // A later session with the same client key: the server refuses before it listens.
    let mut ps = session(1);
    assert!(!ps[1].wait_within(Duration::from_secs(30)));
    assert!(
        ps[1].stderr().contains("has used its 3 queries"),
        "{}",
        ps[1].stderr()
    );
    for p in ps.iter_mut() {
        let _ = p.child.kill();
    }
}
