//! The `parley` command: `parley up` runs Parley in one process; the other
//! subcommands call the admin API or chat as a user.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use parley::{Embedded, EmbeddedConfig};
use parley_client::{Admin, Client, ClientConfig, Event, TlsOptions};
use parley_proto::pb;
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(
    name = "parley",
    version,
    about = "Parley: instant messaging you run yourself"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Parley in one process (SQLite, in-process delivery) until Ctrl-C.
    Up(Box<UpArgs>),
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Print a device token for a user.
    Token {
        user: String,
        /// Lifetime in seconds (0: the server's default, 30 days).
        #[arg(long, default_value_t = 0)]
        ttl_secs: u64,
        /// The one device the token is for (a log-out of that device then
        /// revokes it); default: any device of the user.
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Log a device in with a short-lived access token and a refresh token
    /// (printed on two lines): the device gets its next tokens itself.
    Session {
        user: String,
        device: String,
        /// Access token lifetime in seconds (0: the server's default, 15 minutes).
        #[arg(long, default_value_t = 0)]
        access_ttl_secs: u64,
        /// Refresh token lifetime in seconds, renewed by each refresh (0:
        /// the server's default, 90 days).
        #[arg(long, default_value_t = 0)]
        refresh_ttl_secs: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a user's devices, or log them out.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Manage groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Send one message (text, or a file with an optional caption) and exit.
    Send {
        #[command(flatten)]
        who: ChatArgs,
        /// The text to send (with --file: the file's caption).
        #[arg(required_unless_present = "file")]
        text: Option<String>,
        /// Upload this file and send it (an image, voice, video or any file;
        /// the kind follows its type, read from its name).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Chat interactively: type a line to send it; incoming messages print as they come.
    Chat {
        #[command(flatten)]
        who: ChatArgs,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Where the database and generated keys live.
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "parley-data")]
    data_dir: PathBuf,
    /// Client TCP listener.
    #[arg(long, env = "PARLEY_LISTEN", default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Client WebSocket listener ("off" disables it).
    #[arg(long, env = "PARLEY_WS_LISTEN", default_value = "127.0.0.1:7401")]
    ws_listen: String,
    /// Admin gRPC listener.
    #[arg(long, env = "PARLEY_ADMIN_LISTEN", default_value = "127.0.0.1:7402")]
    admin_listen: SocketAddr,
    /// Admin key (default: read or create <data-dir>/admin.key).
    #[arg(long, env = "PARLEY_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Token-signing secret, at least 32 bytes (default: read or create <data-dir>/token.key).
    #[arg(long, env = "PARLEY_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// The previous token-signing secret, during a rotation: tokens signed
    /// with it are still accepted (new ones are signed with the current
    /// secret). Drop it once the tokens it signed have expired.
    #[arg(long, env = "PARLEY_TOKEN_SECRET_PREVIOUS", hide_env_values = true)]
    token_secret_previous: Option<String>,
    /// Seconds a token passes after its `exp` (and before its `nbf`): the
    /// clock skew allowed between the token's minter and this server.
    #[arg(long, env = "PARLEY_TOKEN_LEEWAY_SECS", default_value_t = parley_core::token::DEFAULT_LEEWAY_SECS)]
    token_leeway_secs: u64,
    /// Largest frame in bytes.
    #[arg(long, env = "PARLEY_MAX_FRAME_BYTES", default_value_t = parley_proto::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Close connections silent for this many seconds.
    #[arg(long, env = "PARLEY_IDLE_TIMEOUT_SECS", default_value_t = 90)]
    idle_timeout_secs: u64,
    /// Most members in a group.
    #[arg(long, env = "PARLEY_MAX_GROUP_MEMBERS", default_value_t = 1000)]
    max_group_members: usize,
    #[command(flatten)]
    conversations: parley_chat::cli::ConversationArgs,
    /// Remove messages older than this many hours (0 keeps everything).
    #[arg(long, env = "PARLEY_RETENTION_HOURS", default_value_t = 0)]
    retention_hours: u64,
    /// Most client connections.
    #[arg(long, env = "PARLEY_MAX_CONNECTIONS", default_value_t = 200_000)]
    max_connections: usize,
    /// Sends per second allowed per connection.
    #[arg(long, env = "PARLEY_SEND_RATE", default_value_t = 100)]
    send_rate: u32,
    /// Sends a connection may make at once before the rate applies.
    #[arg(long, env = "PARLEY_SEND_BURST", default_value_t = 200)]
    send_burst: u32,
    /// Told to clients: how long to wait for a Pong before taking the
    /// connection for dead (milliseconds).
    #[arg(long, env = "PARLEY_PONG_TIMEOUT_MS", default_value_t = 10_000)]
    pong_timeout_ms: u64,
    /// Health (/healthz, /readyz), metrics (/metrics) and the route lookup
    /// (/route) ("off" disables it).
    #[arg(long, env = "PARLEY_OPS_LISTEN", default_value = "127.0.0.1:7403")]
    ops_listen: String,
    /// The host:port clients use to reach this server, as the route lookup
    /// answers it (default: the TCP listener; an unspecified IP becomes
    /// 127.0.0.1).
    #[arg(long, env = "PARLEY_ADVERTISE")]
    advertise: Option<String>,
    /// The public HTTP endpoint: media uploads and downloads, by signed
    /// URL ("off" disables it, and with it media).
    #[arg(long, env = "PARLEY_HTTP_LISTEN", default_value = "127.0.0.1:7404")]
    http_listen: String,
    /// The base URL clients reach the HTTP endpoint at, as the signed URLs
    /// name it (default: http://<--http-listen>; behind a proxy, its URL).
    #[arg(long, env = "PARLEY_PUBLIC_URL")]
    public_url: Option<String>,
    #[command(flatten)]
    media: parley_chat::cli::MediaArgs,
    /// Uploads in an S3-compatible store instead of <data-dir>/media.
    #[command(flatten)]
    s3: parley_chat::cli::S3Args,
    #[command(flatten)]
    limits: parley_gateway::cli::LimitArgs,
    /// Push notifications for users with no device online.
    #[command(flatten)]
    push: parley_push::cli::PushArgs,
}

#[derive(Args, Clone)]
struct AdminArgs {
    /// The admin API.
    #[arg(
        long,
        env = "PARLEY_ADMIN_URL",
        default_value = "http://127.0.0.1:7402"
    )]
    admin_url: String,
    /// The admin key (default: <data-dir>/admin.key).
    #[arg(long, env = "PARLEY_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Where `parley up` keeps its keys.
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "parley-data")]
    data_dir: PathBuf,
}

impl AdminArgs {
    async fn connect(&self) -> anyhow::Result<Admin> {
        let key = match &self.admin_key {
            Some(k) => k.clone(),
            None => {
                let path = self.data_dir.join("admin.key");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("no --admin-key given and {} is unreadable", path.display())
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Admin::connect(&self.admin_url, &key)
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.admin_url))
    }
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user.
    Add {
        id: String,
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// The user's devices: last acknowledged position and time, log-out.
    List {
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Log out one device of the user, or all of them: their tokens are
    /// refused from now on and their connections close.
    Logout {
        user: String,
        /// The device; without it, every device of the user.
        device: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a group; prints its conversation id.
    Create {
        #[arg(long)]
        owner: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Other members.
        members: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Add members to a group.
    Add {
        id: u64,
        users: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove members from a group.
    Remove {
        id: u64,
        users: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show a group.
    Show {
        id: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a user's conversations.
    List {
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args)]
struct ChatArgs {
    /// Gateway address (host:port).
    #[arg(long, env = "PARLEY_SERVER", default_value = "127.0.0.1:7400")]
    server: String,
    /// Ask these route lookups (http://host:port/route or https://,
    /// comma-separated, in order until one answers) for the least-loaded
    /// gateways before every connect; --server is the fallback.
    #[arg(long, env = "PARLEY_ROUTE", value_delimiter = ',')]
    route: Vec<String>,
    /// Connect over TLS, trusting the certificates in this PEM file
    /// ("webpki" trusts the public web roots instead).
    #[arg(long, env = "PARLEY_TLS_CA")]
    tls_ca: Option<String>,
    /// The name the gateway's certificate carries (default: the host).
    #[arg(long, env = "PARLEY_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Act as this user, with a token minted through the admin API (local use).
    #[arg(long = "as", conflicts_with = "token")]
    as_user: Option<String>,
    /// A device token.
    #[arg(long, env = "PARLEY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This device's id.
    #[arg(long, default_value = "cli")]
    device: String,
    /// Talk to this user.
    #[arg(long, conflicts_with = "group")]
    to: Option<String>,
    /// Talk in this group (conversation id).
    #[arg(long)]
    group: Option<u64>,
    #[command(flatten)]
    admin: AdminArgs,
}

impl ChatArgs {
    async fn open(&self) -> anyhow::Result<(Client, tokio::sync::mpsc::Receiver<Event>, u64)> {
        let token = match (&self.token, &self.as_user) {
            (Some(t), _) => t.clone(),
            (None, Some(user)) => self.admin.connect().await?.token(user, 0).await?.token,
            (None, None) => bail!("say who you are: --as USER or --token TOKEN"),
        };
        let mut config = ClientConfig::new(&self.server, token, &self.device);
        config.routes = self.route.clone();
        config.tls = self.tls_ca.as_ref().map(|ca| TlsOptions {
            ca_file: (ca != "webpki").then(|| PathBuf::from(ca)),
            server_name: self.tls_server_name.clone(),
        });
        let (client, events) = Client::connect(config)
            .await
            .with_context(|| format!("cannot log in at {}", self.server))?;
        let conversation = match (&self.to, self.group) {
            (Some(peer), _) => client.open_direct(peer).await?.id,
            (None, Some(id)) => id,
            (None, None) => bail!("say where: --to USER or --group ID"),
        };
        Ok((client, events, conversation))
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {}", parley_core::redact_urls(&format!("{e:#}")));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => {
            parley_ops::init_logging();
            up(*args).await
        }
        Command::User {
            command: UserCommand::Add { id, name, admin },
        } => {
            let u = admin.connect().await?.create_user(&id, &name).await?;
            println!("created user {}", u.id);
            Ok(())
        }
        Command::Token {
            user,
            ttl_secs,
            device,
            admin,
        } => {
            let device = device.unwrap_or_default();
            let mut admin = admin.connect().await?;
            println!(
                "{}",
                admin.device_token(&user, &device, ttl_secs).await?.token
            );
            Ok(())
        }
        Command::Device { command } => device(command).await,
        Command::Session {
            user,
            device,
            access_ttl_secs,
            refresh_ttl_secs,
            admin,
        } => {
            let t = admin
                .connect()
                .await?
                .create_session(&user, &device, access_ttl_secs, refresh_ttl_secs)
                .await?;
            println!("{}\n{}", t.access_token, t.refresh_token);
            Ok(())
        }
        Command::Group { command } => group(command).await,
        Command::Send { who, text, file } => {
            let (client, _events, conv) = who.open().await?;
            let ack = match file {
                Some(path) => {
                    let caption = text.unwrap_or_default();
                    let progress = progress_printer("upload", &path);
                    let (ack, blob) = client
                        .send_file(conv, &path, &caption, Some(progress))
                        .await?;
                    eprintln!();
                    println!("uploaded: {}", describe_blob(&blob));
                    ack
                }
                None => {
                    client
                        .send(conv, pb::Content::text(text.unwrap_or_default()))
                        .await?
                }
            };
            println!(
                "sent: conversation {} seq {} msg_id {}",
                ack.conversation_id, ack.seq, ack.msg_id
            );
            client.close().await;
            Ok(())
        }
        Command::Chat { who } => chat(who).await,
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut cfg = EmbeddedConfig::ephemeral(args.data_dir.clone());
    cfg.listen = args.listen;
    cfg.ws_listen = match args.ws_listen.as_str() {
        "off" | "" => None,
        a => Some(a.parse().context("--ws-listen")?),
    };
    cfg.admin_listen = args.admin_listen;
    cfg.admin_key = args.admin_key;
    cfg.token_secret = args.token_secret;
    cfg.token_secret_previous = args.token_secret_previous;
    cfg.token_leeway_secs = args.token_leeway_secs;
    cfg.chat.max_group_members = args.max_group_members;
    cfg.chat = args.conversations.apply(cfg.chat);
    cfg.chat.retention =
        (args.retention_hours > 0).then(|| Duration::from_secs(args.retention_hours * 3600));
    cfg.gateway.max_frame_bytes = args.max_frame_bytes;
    cfg.gateway.idle_timeout = Duration::from_secs(args.idle_timeout_secs.max(1));
    cfg.gateway.max_connections = args.max_connections;
    cfg.gateway.send_rate = args.send_rate;
    cfg.gateway.limits = args.limits.limits();
    cfg.gateway.send_burst = args.send_burst.max(1);
    cfg.gateway.pong_timeout = Duration::from_millis(args.pong_timeout_ms.max(1));
    cfg.ops_listen = match args.ops_listen.as_str() {
        "off" | "" => None,
        a => Some(a.parse().context("--ops-listen")?),
    };
    cfg.advertise = args.advertise;
    cfg.http_listen = match args.http_listen.as_str() {
        "off" | "" => None,
        a => Some(a.parse().context("--http-listen")?),
    };
    cfg.public_url = args.public_url;
    cfg.chat.media = args.media.limits()?;
    cfg.s3 = args.s3.config()?;
    cfg.push = args.push.providers().map_err(anyhow::Error::msg)?;
    let server = Embedded::start(cfg).await?;
    tracing::info!(
        tcp = %server.tcp_addr,
        websocket = ?server.ws_addr,
        admin = %server.admin_url(),
        ops = ?server.ops_addr,
        media = ?server.public_url,
        data_dir = %args.data_dir.display(),
        "Parley is up; the admin key is in {}/admin.key. Ctrl-C stops it.",
        args.data_dir.display()
    );
    parley_ops::terminated().await;
    tracing::info!("stopping: telling clients to reconnect");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn group(command: GroupCommand) -> anyhow::Result<()> {
    let show = |c: pb::Conversation| {
        println!(
            "group {} {:?} owner={} members={}",
            c.id,
            c.name,
            c.owner,
            c.members.join(",")
        )
    };
    match command {
        GroupCommand::Create {
            owner,
            name,
            members,
            admin,
        } => {
            let c = admin
                .connect()
                .await?
                .create_group(&owner, &name, &members)
                .await?;
            println!("{}", c.id);
        }
        GroupCommand::Add { id, users, admin } => {
            show(admin.connect().await?.add_members(id, &users).await?)
        }
        GroupCommand::Remove { id, users, admin } => {
            show(admin.connect().await?.remove_members(id, &users).await?)
        }
        GroupCommand::Show { id, admin } => show(admin.connect().await?.conversation(id).await?),
        GroupCommand::List { user, admin } => {
            for c in admin.connect().await?.conversations(&user).await? {
                show(c);
            }
        }
    }
    Ok(())
}

async fn device(command: DeviceCommand) -> anyhow::Result<()> {
    let time = |ms: i64| match ms {
        0 => "never".to_owned(),
        ms => format!("{ms} ms since the epoch"),
    };
    match command {
        DeviceCommand::List { user, admin } => {
            for d in admin.connect().await?.devices(&user).await? {
                println!(
                    "{} cursor={} last_seen={} logged_out={}",
                    d.device_id,
                    d.cursor,
                    time(d.last_seen_ms),
                    time(d.logged_out_at_ms)
                );
            }
        }
        DeviceCommand::Logout {
            user,
            device,
            admin,
        } => {
            let at = admin
                .connect()
                .await?
                .log_out(&user, device.as_deref())
                .await?;
            let which = device.map_or("every device".to_owned(), |d| format!("device {d}"));
            println!("logged out {which} of {user}: tokens issued until {at} ms are refused");
        }
    }
    Ok(())
}

fn render(m: &pb::Message) -> String {
    use pb::content::Body;
    let when = (m.server_time_ms / 1000) % 86_400;
    let clock = format!(
        "{:02}:{:02}:{:02}",
        when / 3600,
        (when / 60) % 60,
        when % 60
    );
    let body = match m.content.as_ref().and_then(|c| c.body.as_ref()) {
        Some(Body::Text(t)) => t.clone(),
        Some(Body::Media(media)) if !media.blob_id.is_empty() => {
            let size = human_bytes(media.size_bytes);
            let dims = if media.width > 0 {
                format!(" {}x{}", media.width, media.height)
            } else {
                String::new()
            };
            let caption = if media.caption.is_empty() {
                String::new()
            } else {
                format!(" {}", media.caption)
            };
            format!(
                "[{:?} {}{dims}, {size}]{caption} (/save {} to keep it)",
                media.kind(),
                media.name,
                m.seq
            )
        }
        Some(Body::Media(media)) => format!("[{:?}] {}", media.kind(), media.url),
        Some(Body::Custom(c)) => format!("[{}: {} bytes]", c.r#type, c.data.len()),
        Some(Body::System(e)) => format!("* {} {:?} {}", e.actor, e.kind(), e.users.join(", ")),
        None if m.recalled => "(recalled)".to_owned(),
        None => String::new(),
    };
    let edited = if m.edited_at_ms != 0 { " (edited)" } else { "" };
    format!("[{clock} UTC] #{} {}: {body}{edited}", m.seq, m.sender_id)
}

/// "1.5 MB" for a byte count.
fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

fn describe_blob(b: &pb::Blob) -> String {
    let dims = if b.width > 0 {
        format!(", {}x{}", b.width, b.height)
    } else {
        String::new()
    };
    let thumb = if b.thumbnail.is_some() {
        ", with a thumbnail"
    } else {
        ""
    };
    format!(
        "{} ({}, {}{dims}{thumb})",
        b.name,
        b.mime_type,
        human_bytes(b.size_bytes)
    )
}

/// Prints a transfer's progress on stderr, a line rewritten in place at
/// each whole percent.
fn progress_printer(what: &'static str, path: &std::path::Path) -> parley_client::Progress {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let last = std::sync::atomic::AtomicU64::new(u64::MAX);
    std::sync::Arc::new(move |done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if last.swap(pct, std::sync::atomic::Ordering::Relaxed) != pct {
            eprint!(
                "\r{what} {name}: {pct:>3}% ({} of {})",
                human_bytes(done),
                human_bytes(total)
            );
        }
    })
}

/// `name` in the current directory, or `name (1)`, `name (2)`, ... (before
/// its extension) when that is taken: a save never replaces a file.
fn unused_name(name: &str) -> PathBuf {
    let path = std::path::Path::new(name);
    if !path.exists() {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (1..)
        .map(|i| PathBuf::from(format!("{stem} ({i}){ext}")))
        .find(|p| !p.exists())
        .expect("some name is free")
}

/// The commands of `parley chat`: files, mutes, notification settings.
async fn chat_command(client: &parley_client::Client, conv: u64, line: &str) -> anyhow::Result<()> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("/file") => {
            let path = PathBuf::from(words.next().context("/file PATH [caption]")?);
            let caption = words.collect::<Vec<_>>().join(" ");
            let progress = progress_printer("upload", &path);
            let (_, blob) = client
                .send_file(conv, &path, &caption, Some(progress))
                .await?;
            eprintln!();
            println!("-- sent {}", describe_blob(&blob));
        }
        Some("/save") => {
            let seq: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .context("/save SEQ [PATH]")?;
            let page = client
                .history(conv, seq + 1, pb::Direction::Backward, 1)
                .await?;
            let message = page
                .messages
                .into_iter()
                .find(|m| m.seq == seq)
                .with_context(|| format!("no message {seq} here"))?;
            let name = match message.content.as_ref().and_then(|c| c.body.as_ref()) {
                Some(pb::content::Body::Media(m)) if !m.blob_id.is_empty() => {
                    // Only the file's own name, never a path it claims.
                    std::path::Path::new(&m.name)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| format!("parley-{conv}-{seq}"))
                }
                _ => bail!("message {seq} holds no file"),
            };
            let dest = match words.next() {
                Some(p) => PathBuf::from(p),
                None => unused_name(&name),
            };
            let progress = progress_printer("download", &dest);
            let n = client
                .download(&message, false, &dest, Some(progress))
                .await?;
            eprintln!();
            println!("-- saved {} ({})", dest.display(), human_bytes(n));
        }
        Some("/mute") => {
            let until = match words.next() {
                None => i64::MAX,
                Some(h) => {
                    let hours: i64 = h.parse().context("/mute [HOURS]")?;
                    parley_core::now_ms().saturating_add(hours.saturating_mul(3_600_000))
                }
            };
            client.mute(conv, until).await?;
            match until {
                i64::MAX => println!("-- muted until you unmute it"),
                _ => println!(
                    "-- muted for {} hours",
                    (until - parley_core::now_ms() + 1) / 3_600_000
                ),
            }
        }
        Some("/unmute") => {
            client.mute(conv, 0).await?;
            println!("-- unmuted");
        }
        Some("/previews") => {
            let set = match words.next() {
                Some("on") => Some(true),
                Some("off") => Some(false),
                None => None,
                Some(_) => bail!("/previews [on|off]"),
            };
            let on = client.notification_previews(set).await?;
            println!("-- notification previews {}", if on { "on" } else { "off" });
        }
        Some("/push") => {
            let token = words.next().context("/push TOKEN")?;
            client
                .register_push(pb::PushProvider::Webhook, token, "", "")
                .await?;
            println!(
                "-- this device is woken through the push webhook as {token:?} while you are offline"
            );
        }
        Some("/edit") => {
            let seq: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .context("/edit SEQ TEXT")?;
            let text = words.collect::<Vec<_>>().join(" ");
            client.edit(conv, seq, text).await?;
        }
        Some("/recall") => {
            let seq: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .context("/recall SEQ")?;
            client.recall(conv, seq).await?;
        }
        Some("/edits") => {
            let seq: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .context("/edits SEQ")?;
            for v in client.edit_history(conv, seq).await? {
                let text = v.content.as_ref().and_then(|c| c.as_text()).unwrap_or("");
                println!("-- was {text:?} until {} ms", v.replaced_at_ms);
            }
        }
        Some(cmd @ ("/pin" | "/unpin")) => {
            client.pin(conv, cmd == "/pin").await?;
            println!("-- {}ned", &cmd[1..]);
        }
        Some("/list") => {
            let list = client.conversations(0, "").await?;
            for c in &list.conversations {
                let name = match c.kind() {
                    pb::ConversationKind::Direct => c.members.join(" & "),
                    _ => format!("{} ({} members)", c.name, c.members.len()),
                };
                let last = c.last_message.as_ref().map(render).unwrap_or_default();
                let pin = if c.pinned { "^ " } else { "" };
                println!("{pin}{} {name}: {} unread  {last}", c.id, c.unread_count);
            }
            println!("-- {} unread in all", list.total_unread);
        }
        Some("/receipts") => {
            let seq: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .context("/receipts SEQ")?;
            let r = client.receipts(conv, seq).await?;
            let names = if r.readers.is_empty() {
                String::new()
            } else {
                format!(": {}", r.readers.join(", "))
            };
            println!(
                "-- message {seq} read by {} of {}{names}",
                r.read_count, r.others
            );
        }
        _ => println!(
            "commands: /file PATH [caption], /save SEQ [PATH], /edit SEQ TEXT, /recall SEQ, \
             /edits SEQ, /mute [HOURS], /unmute, /pin, /unpin, /list (conversations and unread \
             counts), /receipts SEQ, /previews [on|off], /push TOKEN (the webhook's), other lines \
             are sent as text"
        ),
    }
    Ok(())
}

async fn chat(who: ChatArgs) -> anyhow::Result<()> {
    let (client, mut events, conv) = who.open().await?;
    let recent = client.history(conv, 0, pb::Direction::Backward, 20).await?;
    for m in &recent.messages {
        println!("{}", render(m));
    }
    // The login's catch-up delivers again whatever came since this device
    // last acknowledged, and the newest of it is in the history just shown.
    // Those are skipped; anything newer than the history is shown.
    let mut shown: Vec<u64> = recent.messages.iter().map(|m| m.seq).collect();
    let newest_shown = shown.iter().copied().max().unwrap_or(0);
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        println!(
            "-- conversation {conv} as {}; type and press Enter, /file PATH to send a file, \
             Ctrl-D to leave --",
            client.user_id()
        );
    }
    // What is shown is read: the marker follows, at most once a second.
    let mut read_up_to = newest_shown;
    let mut marked = 0;
    let mut mark_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            _ = mark_tick.tick(), if read_up_to > marked => {
                match client.mark_read(conv, read_up_to).await {
                    Ok(_) => marked = read_up_to,
                    Err(e) => eprintln!("! read marker not moved: {e}"),
                }
            }
            line = lines.next_line() => match line? {
                Some(text) if text.trim().is_empty() => {}
                Some(text) if text.starts_with('/') => {
                    if let Err(e) = chat_command(&client, conv, &text).await {
                        eprintln!("! {e:#}");
                    }
                }
                Some(text) => match client.send(conv, pb::Content::text(text)).await {
                    Ok(_) => {}
                    Err(e) => eprintln!("! not sent: {e}"),
                },
                None => break,
            },
            ev = events.recv() => match ev {
                Some(Event::Message { message, .. })
                    if message.conversation_id == conv && message.recalled =>
                {
                    println!("-- {} recalled message {}", message.sender_id, message.seq);
                }
                Some(Event::Message { message, .. })
                    if message.conversation_id == conv && message.edited_at_ms != 0 =>
                {
                    println!("-- message {} edited: {}", message.seq, render(&message));
                }
                Some(Event::Message { message, .. }) if message.conversation_id == conv => {
                    if message.seq > newest_shown {
                        shown.clear();
                    }
                    if !shown.contains(&message.seq) {
                        println!("{}", render(&message));
                    }
                    read_up_to = read_up_to.max(message.seq);
                }
                Some(Event::Read(r)) if r.conversation_id == conv && r.user != client.user_id() => {
                    println!("-- {} read up to {}", r.user, r.seq);
                }
                Some(Event::Typing(t)) if t.conversation_id == conv && t.typing => {
                    println!("-- {} is typing...", t.user);
                }
                Some(Event::Disconnected { reason }) => eprintln!("! disconnected ({reason}); reconnecting"),
                Some(Event::Closed(e)) => bail!("the server ended this session: {e}"),
                Some(Event::Synced(s)) if !s.complete => {
                    eprintln!("! messages {}..={} were removed by retention", s.missing_from, s.missing_to)
                }
                Some(_) => {}
                None => bail!("connection closed"),
            },
        }
    }
    client.close().await;
    Ok(())
}
