//! `brelu secure`: run a model under 3-party secure inference (all parties on loopback, or one
//! party of a multi-host session) and benchmark the ring GEMM.
use super::table::{human_bytes, thousands, Table};
use super::{parse_input, print_json};
use crate::experiment::Experiment;
use crate::models::{find, Model};
use crate::secure::engine::{run_party, ClientInput};
use crate::secure::join::{connect_retry, Join};
use crate::secure::noise::{fingerprint, Identity, Trust};
use crate::secure::party::Role;
use crate::secure::plan::{argmax, DreluProtocol, Plan, Settings};
use crate::secure::ring::Fixed;
use crate::secure::{run_compare, LinkConfig, RunReport};
use crate::train::Config;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand, Debug)]
pub enum SecureCommand {
    /// Run client, server and dealer in this process over loopback TCP and compare with the
    /// plaintext fixed-point and float models.
    Run(RunArgs),
    /// Run one party of a session (for real multi-host use). Every party authenticates the
    /// others by their pinned public keys (see `keygen`) and all links are encrypted.
    Party(PartyArgs),
    /// Write a party's static key pair: ROLE.key (private, mode 0600; stays with the party)
    /// and ROLE.pub (give it to the two other parties).
    Keygen(KeygenArgs),
    /// Ring (wrapping u64) GEMM throughput next to f64 GEMM (libtorch BLAS) in the same run.
    /// A developer's micro-benchmark (BENCHMARKS.md), so left out of the help.
    #[command(hide = true)]
    Gemm(GemmArgs),
}

/// Model, spec, data and protocol settings shared by `run` and `party`.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Architecture (see `brelu models`); taken from --data when given.
    #[arg(long, short)]
    pub model: Option<String>,
    /// Input size C,H,W (default: the architecture's own or the --data configuration's).
    #[arg(long, value_parser = parse_input)]
    pub input: Option<[usize; 3]>,
    /// Number of classes (default: the architecture's own or the --data configuration's).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Trained weights (safetensors); without them the model has seeded random weights.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Block-ReLU spec (default: ordinary ReLU everywhere).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Training configuration naming the model and data set; test images come from it.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Number of images to run.
    #[arg(long, default_value_t = 1)]
    pub images: usize,
    /// Fractional bits of the fixed-point encoding.
    #[arg(long, default_value_t = 12)]
    pub frac_bits: u32,
    /// Bits compared per DReLU: 64 = exact; fewer compare a window of the top bits.
    #[arg(long, default_value_t = 64)]
    pub drelu_bits: u32,
    /// DReLU protocol: msb (one PrivateCompare on a dealer mask with known bits, 3 message
    /// trips) or share-convert (SecureNN's, as in the published code: 6 trips, 2x the bytes).
    #[arg(long, default_value = "msb", value_parser = parse_drelu_protocol)]
    pub drelu_protocol: DreluProtocol,
    /// With --drelu-bits < 64: values up to 2^this (real units) fit the window.
    #[arg(long, default_value_t = 12)]
    pub drelu_range_bits: u32,
    /// Reveal only the arg-max to the client, not the logits. The server's policy: part of
    /// the session hash, so a client without it is refused at the handshake.
    #[arg(long)]
    pub argmax_only: bool,
    /// DReLUs computed together; a larger site runs in batches, which bounds every party's
    /// memory whatever the model's size (all parties must agree).
    #[arg(long, default_value_t = crate::secure::plan::DEFAULT_DRELU_BATCH)]
    pub drelu_batch: usize,
    /// Seconds to wait for each message from a peer (all of its frames) and for each frame
    /// to go out before giving up.
    #[arg(long, default_value_t = crate::secure::link::DEFAULT_TIMEOUT_S)]
    pub timeout: f64,
    /// Seconds to wait for the other parties to connect and authenticate at session start.
    #[arg(long, default_value_t = crate::secure::link::DEFAULT_TIMEOUT_S)]
    pub connect_timeout: f64,
    /// Largest frame in MiB; larger messages travel as several frames.
    #[arg(long, default_value_t = crate::secure::link::DEFAULT_MAX_FRAME_MB)]
    pub max_frame_mb: usize,
    /// Most MiB of the dealer's material a party keeps before it is needed.
    #[arg(long, default_value_t = crate::secure::link::DEFAULT_MAX_AHEAD_MB)]
    pub max_ahead_mb: usize,
    /// Dealer: DReLU batches its offline thread may prepare ahead of the comparisons.
    #[arg(long, default_value_t = crate::secure::link::DEFAULT_AHEAD_BATCHES)]
    pub dealer_ahead: u64,
    /// Seed of random weights and random images (when no --weights / --data).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub session: SessionArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PartyArgs {
    /// client, server or dealer.
    #[arg(long)]
    pub role: String,
    #[command(flatten)]
    pub session: SessionArgs,
    /// Address to listen on (client: for server and dealer; server: for the dealer).
    #[arg(long)]
    pub listen: Option<String>,
    /// Peers to connect to: `client=HOST:PORT` (server, dealer), `server=HOST:PORT` (dealer).
    #[arg(long = "peer", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// This party's private key file (from `brelu secure keygen`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The pinned public key of another party, `ROLE=FILE`; give both other roles.
    #[arg(long = "peer-key", value_delimiter = ',')]
    pub peer_keys: Vec<String>,
    /// A folder holding this party's ROLE.key and the other two's .pub files (what
    /// `keygen --role all` writes; for tests and single-operator setups), instead of --key and
    /// --peer-key.
    #[arg(long, conflicts_with_all = ["key", "peer_keys"])]
    pub keys: Option<PathBuf>,
    /// Server: run with seeded random weights instead of --weights (demos and tests).
    #[arg(long)]
    pub random_weights: bool,
    /// Server: the most images the pinned client key may have classified, counted across
    /// sessions in --query-state (a bound on model extraction by querying; docs/method.md
    /// 8.8). Each image counts when it starts.
    #[arg(long)]
    pub max_queries: Option<u64>,
    /// Server: the file counting images per client key for --max-queries (JSON, written
    /// atomically; one server process per file).
    #[arg(long, default_value = "brelu-queries.json", requires = "max_queries")]
    pub query_state: PathBuf,
    /// Print the client's result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// client, server, dealer, or all (three key pairs in one folder, for tests and demos).
    #[arg(long)]
    pub role: String,
    /// Folder to write the key files into.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct GemmArgs {
    /// Matrix sizes M,K,N.
    #[arg(long, default_value = "512,4608,64")]
    pub shape: String,
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
}

fn parse_drelu_protocol(s: &str) -> std::result::Result<DreluProtocol, String> {
    DreluProtocol::parse(s).ok_or_else(|| format!("'{s}': expected msb or share-convert"))
}

pub fn run(c: SecureCommand) -> Result<()> {
    match c {
        SecureCommand::Run(a) => run_cmd(a),
        SecureCommand::Party(a) => party_cmd(a),
        SecureCommand::Keygen(a) => keygen_cmd(a),
        SecureCommand::Gemm(a) => gemm_cmd(a),
    }
}

/// The model (weights and spec applied), test images and labels of a session.
struct Session {
    model: Model,
    images: Vec<Vec<f32>>,
    labels: Option<Vec<usize>>,
    settings: Settings,
    link: LinkConfig,
}

fn load_session(a: &SessionArgs, need_images: bool) -> Result<Session> {
    let cfg: Option<Config> = match &a.data {
        Some(p) => Some(Config::load(p).context("reading the data configuration")?),
        None => None,
    };
    let mut exp = match (&a.model, &cfg) {
        (_, Some(c)) => Experiment::of_config(c),
        (Some(m), None) => Experiment::of_model(m, None, None)?,
        (None, None) => bail!("give --model or --data"),
    };
    if let Some(m) = &a.model {
        exp.model = find(m)?.name().to_string();
    }
    exp.input = a.input.unwrap_or(exp.input);
    exp.classes = a.classes.unwrap_or(exp.classes);
    exp.seed = a.seed;
    let exp = exp
        .with_weights(a.weights.as_deref())
        .with_spec(a.spec.as_deref());
    let model = exp.load_model()?;
    let settings = Settings {
        fixed: Fixed { frac: a.frac_bits },
        drelu: a.drelu_protocol,
        drelu_batch: a.drelu_batch,
        drelu_bits: a.drelu_bits,
        drelu_range_bits: a.drelu_range_bits,
        argmax_only: a.argmax_only,
    };
    settings.validate()?;
    if a.timeout <= 0.0 || a.connect_timeout <= 0.0 {
        bail!("--timeout and --connect-timeout must be positive");
    }
    if !(1..=4095).contains(&a.max_frame_mb) || a.max_ahead_mb == 0 {
        bail!("--max-frame-mb must be in 1..=4095 and --max-ahead-mb at least 1");
    }
    let link = LinkConfig {
        timeout: Duration::from_secs_f64(a.timeout),
        connect_timeout: Duration::from_secs_f64(a.connect_timeout),
        max_frame: a.max_frame_mb << 20,
        max_ahead: a.max_ahead_mb << 20,
        ahead_batches: a.dealer_ahead,
    };
    let (images, labels) = if need_images {
        let t = exp
            .test_images(a.images)
            .context("loading the test images")?;
        (t.images, t.labels)
    } else {
        (Vec::new(), None)
    };
    Ok(Session {
        model,
        images,
        labels,
        settings,
        link,
    })
}

fn run_cmd(a: RunArgs) -> Result<()> {
    let s = load_session(&a.session, true)?;
    let r = run_compare(&s.model, &s.images, s.labels.as_deref(), s.settings, s.link)
        .context("secure inference")?;
    if a.json {
        return print_json(&r);
    }
    print_report(&r);
    Ok(())
}

fn print_report(r: &RunReport) {
    println!(
        "{} at {:?}: {} ReLUs, {} DReLUs per image ({:.2}%), {} fractional bits, {}-bit {} DReLU{}",
        r.model,
        r.input,
        thousands(r.relus as u64),
        thousands(r.drelus_per_image as u64),
        100.0 * r.drelus_per_image as f64 / r.relus.max(1) as f64,
        r.frac_bits,
        r.drelu_bits,
        r.drelu_protocol.name(),
        if r.argmax_only { ", arg-max only" } else { "" }
    );
    println!(
        "session setup (weight masks opened once): {} in {:.2} s",
        human_bytes(r.setup_bytes.total),
        r.setup_seconds
    );
    let mut t = Table::new(&[
        "image",
        "label",
        "secure",
        "plain",
        "float",
        "max err",
        "time s",
        "client-server",
        "client-dealer",
        "server-dealer",
        "total",
    ]);
    for i in &r.images {
        t.row(vec![
            i.index.to_string(),
            i.label.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            i.prediction.to_string(),
            i.plaintext_prediction.to_string(),
            i.float_prediction.to_string(),
            i.max_logit_error
                .map(|e| format!("{e:.2e}"))
                .unwrap_or_else(|| "-".into()),
            format!("{:.2}", i.seconds),
            human_bytes(i.bytes.client_server),
            human_bytes(i.bytes.client_dealer),
            human_bytes(i.bytes.server_dealer),
            human_bytes(i.bytes.total),
        ]);
    }
    println!("{}", t.render());
    let mut l = Table::new(&["layer", "kind", "time ms", "bytes", "rounds", "DReLUs"]).left(1);
    for x in &r.layers {
        l.row(vec![
            x.name.clone(),
            x.kind.clone(),
            format!("{:.1}", 1e3 * x.seconds),
            human_bytes(x.bytes),
            x.rounds.to_string(),
            thousands(x.drelus),
        ]);
    }
    println!("per layer, per image:\n{}", l.render());
    for i in &r.images {
        if let Some(a) = i.pixel_agreement {
            println!(
                "image {}: {:.2}% of the pixels get the plaintext fixed-point class (a logit \
                 map: the prediction columns above are arg-maxes over all its values)",
                i.index,
                100.0 * a
            );
        }
    }
    println!(
        "mean per image: {:.2} s, {} ({} client-server, {} client-dealer, {} server-dealer); \
         secure = plaintext prediction on {}/{} images{}",
        r.mean_seconds,
        human_bytes(r.mean_bytes.total),
        human_bytes(r.mean_bytes.client_server),
        human_bytes(r.mean_bytes.client_dealer),
        human_bytes(r.mean_bytes.server_dealer),
        r.agree_plaintext,
        r.images.len(),
        r.correct
            .map(|c| format!("; correct {c}/{}", r.images.len()))
            .unwrap_or_default()
    );
    if r.far_off_images > 0 {
        eprintln!(
            "warning: {} image(s) have logits more than {} from the plaintext fixed-point pass: \
             a local truncation failed (its probability grows with |value| * 2^frac / 2^64: use \
             fewer --frac-bits than {}) or a patch summing to within a few ulps of 0 decided \
             differently",
            r.far_off_images,
            crate::secure::report::FAR_OFF,
            r.frac_bits
        );
    }
}

fn peer_addr<'a>(peers: &'a [String], role: &str) -> Result<&'a str> {
    peers
        .iter()
        .find_map(|p| p.strip_prefix(&format!("{role}=")))
        .with_context(|| format!("missing --peer {role}=HOST:PORT"))
}

fn keygen_cmd(a: KeygenArgs) -> Result<()> {
    let roles: Vec<Role> = match a.role.as_str() {
        "all" => Role::ALL.to_vec(),
        r => vec![Role::parse(r)
            .with_context(|| format!("--role must be client, server, dealer or all, got '{r}'"))?],
    };
    for r in &roles {
        let key = a.out.join(format!("{}.key", r.name()));
        if key.exists() && !a.force {
            bail!(
                "{} exists: a party's key is its identity, so it is not replaced without --force",
                key.display()
            );
        }
    }
    for r in roles {
        let id = Identity::generate(r)?;
        let (key, public) = id.save(&a.out)?;
        println!(
            "{r}: private key {} (keep it with the {r}), public key {} (give it to the others), \
             fingerprint {}",
            key.display(),
            public.display(),
            fingerprint(&id.public)
        );
    }
    Ok(())
}

/// The party's own key and the pinned keys of the two others, from --keys or --key/--peer-key.
fn load_keys(a: &PartyArgs, role: Role) -> Result<(Identity, Trust)> {
    let others: Vec<Role> = Role::ALL.into_iter().filter(|r| *r != role).collect();
    let mut trust = Trust::default();
    let (key, peers): (PathBuf, Vec<(Role, PathBuf)>) = match &a.keys {
        Some(dir) => (
            dir.join(format!("{}.key", role.name())),
            others
                .iter()
                .map(|r| (*r, dir.join(format!("{}.pub", r.name()))))
                .collect(),
        ),
        None => {
            let key = a.key.clone().with_context(|| {
                format!(
                    "the {role} needs its private key: --key FILE (or --keys DIR); make one with \
                     `brelu secure keygen --role {role} -o DIR`"
                )
            })?;
            let mut peers = Vec::new();
            for p in &a.peer_keys {
                let (r, f) = p
                    .split_once('=')
                    .with_context(|| format!("--peer-key must be ROLE=FILE, got '{p}'"))?;
                let r = Role::parse(r)
                    .with_context(|| format!("--peer-key: unknown role '{r}' in '{p}'"))?;
                if r == role {
                    bail!("--peer-key {p}: that is this party's own role");
                }
                peers.push((r, PathBuf::from(f)));
            }
            (key, peers)
        }
    };
    let id = Identity::load(&key).context("loading this party's key")?;
    if id.role != role {
        bail!(
            "{}: the key is the {}'s, but this party runs as the {role}",
            key.display(),
            id.role
        );
    }
    for (r, f) in peers {
        trust
            .pin_file(r, &f)
            .context("loading a pinned public key")?;
    }
    for r in others {
        if trust.get(r).is_none() {
            bail!("missing --peer-key {r}=FILE: the {role} must pin the {r}'s public key");
        }
    }
    trust.check_distinct(&id)?;
    Ok((id, trust))
}

fn party_cmd(a: PartyArgs) -> Result<()> {
    let role = Role::parse(&a.role)
        .with_context(|| format!("--role must be client, server or dealer, got '{}'", a.role))?;
    if role == Role::Server && a.session.weights.is_none() && !a.random_weights {
        bail!(
            "the server needs the model's weights: --weights FILE.safetensors (or \
             --random-weights for a demo with seeded random weights)"
        );
    }
    if a.max_queries.is_some() && role != Role::Server {
        bail!("--max-queries is the server's policy; the {role} cannot set it");
    }
    let (identity, trust) = load_keys(&a, role)?;
    let budget = match a.max_queries {
        Some(max) => {
            let client = trust.get(Role::Client).context("the client's pinned key")?;
            let b = crate::secure::budget::QueryBudget {
                path: a.query_state.clone(),
                client: fingerprint(client),
                max,
            };
            let used = b.used().context("reading the query state")?;
            if used >= max {
                bail!(
                    "the client (key {}) has used its {max} queries ({}); raise --max-queries \
                     or use another --query-state",
                    b.client,
                    b.path.display()
                );
            }
            eprintln!(
                "server: client key {} has {} of {max} queries left",
                b.client,
                max - used
            );
            Some(b)
        }
        None => None,
    };
    let s = load_session(&a.session, role == Role::Client)?;
    let (plan, weights) = Plan::from_model(&s.model, s.settings)?;
    // Checked before any peer is contacted: a bad image must not cost the others a session.
    let input = ClientInput {
        images: s
            .images
            .iter()
            .enumerate()
            .map(|(i, x)| plan.settings.fixed.encode_all(x, &format!("image {i}")))
            .collect::<crate::error::Result<_>>()?,
    };
    let timeout = s.link.connect_timeout;
    let hash = plan.hash();
    let join = Join {
        identity: &identity,
        trust: &trust,
        settings: plan.settings,
        session_hash: &hash,
        cfg: s.link,
        layers: plan.layers.len(),
    };
    let mut dialed = Vec::new();
    for peer in Role::ALL.into_iter().filter(|r| *r < role) {
        let addr = peer_addr(&a.peers, peer.name())?;
        dialed.push((peer, connect_retry(addr, peer.name(), timeout)?));
    }
    let mut on_refused = |e: &crate::error::Error| eprintln!("{role}: {e}; still waiting");
    let mut p = if role == Role::Dealer {
        join.connected(dialed)
    } else {
        let addr = a.listen.as_deref().context("missing --listen HOST:PORT")?;
        let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        join.listening(dialed, &l, &mut on_refused)
    }
    .with_context(|| format!("{role}: session handshake"))?;
    p.budget = budget;
    eprintln!("{role}: session started (hash {})", &hash[..16]);
    let w = (role == Role::Server).then_some(&weights);
    let run = run_party(p, &plan, w, (role == Role::Client).then_some(&input))
        .with_context(|| format!("{role}: secure inference"))?;
    if role == Role::Client {
        if a.json {
            return print_json(&run);
        }
        for (i, im) in run.images.iter().enumerate() {
            let pred = match (&im.pixel_classes, im.argmax) {
                (Some(c), _) => format!("classes of {} pixels", c.len()),
                (None, Some(k)) => k.to_string(),
                (None, None) => argmax(im.logits.as_deref().unwrap_or(&[])).to_string(),
            };
            println!(
                "image {i}: prediction {pred}{}  {:.2} s  sent {} to server, {} to dealer",
                s.labels
                    .as_ref()
                    .and_then(|l| l.get(i))
                    .map(|l| format!(" (label {l})"))
                    .unwrap_or_default(),
                im.seconds,
                human_bytes(im.bytes_sent[1]),
                human_bytes(im.bytes_sent[2])
            );
        }
    } else {
        let sent = |r: usize| run.images.iter().map(|i| i.bytes_sent[r]).sum::<u64>();
        eprintln!(
            "{role}: served {} image(s); sent {} to the client, {} to the server, {} to the \
             dealer (session setup {})",
            run.images.len(),
            human_bytes(sent(0)),
            human_bytes(sent(1)),
            human_bytes(sent(2)),
            human_bytes(run.setup_bytes.iter().sum())
        );
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct GemmReport {
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    ring_seconds: f64,
    ring_gmacs: f64,
    f64_seconds: f64,
    f64_gflops: f64,
}

fn gemm_cmd(a: GemmArgs) -> Result<()> {
    let d: Vec<usize> = a
        .shape
        .split(',')
        .map(|v| v.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .context("--shape must be M,K,N")?;
    let [m, k, n] = d[..] else {
        bail!("--shape must be M,K,N")
    };
    let av: Vec<u64> = (0..m * k)
        .map(|i| (i as u64).wrapping_mul(0x9e3779b97f4a7c15))
        .collect();
    let bv: Vec<u64> = (0..k * n)
        .map(|i| (i as u64).wrapping_mul(0xd1b54a32d192ed03))
        .collect();
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = std::time::Instant::now();
        for _ in 0..a.repeat.max(1) {
            f();
        }
        t.elapsed().as_secs_f64() / a.repeat.max(1) as f64
    };
    let mut sink = 0u64;
    let ring_s = time(&mut || {
        let c = crate::secure::gemm::gemm(m, k, n, &av, &bv);
        sink = sink.wrapping_add(c[0]);
    });
    let at = Tensor::randn([m as i64, k as i64], (Kind::Double, Device::Cpu));
    let bt = Tensor::randn([k as i64, n as i64], (Kind::Double, Device::Cpu));
    let f64_s = time(&mut || {
        let c = at.matmul(&bt);
        sink = sink.wrapping_add(c.double_value(&[0, 0]) as u64);
    });
    let macs = (m * k * n) as f64;
    let r = GemmReport {
        m,
        k,
        n,
        threads: rayon::current_num_threads(),
        ring_seconds: ring_s,
        ring_gmacs: macs / ring_s / 1e9,
        f64_seconds: f64_s,
        f64_gflops: 2.0 * macs / f64_s / 1e9,
    };
    if a.json {
        return print_json(&r);
    }
    println!(
        "{m}x{k} * {k}x{n} on {} threads: ring (wrapping u64) {:.3} s = {:.2} G multiply-adds/s; \
         f64 (libtorch BLAS, {} threads) {:.4} s = {:.2} GFLOP/s ({:.2} G multiply-adds/s){}",
        r.threads,
        ring_s,
        r.ring_gmacs,
        tch::get_num_threads(),
        f64_s,
        r.f64_gflops,
        r.f64_gflops / 2.0,
        if sink == 1 { " " } else { "" }
    );
    Ok(())
}
