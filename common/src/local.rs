//! How to run the local stack's services (tansu, redis-server); shared by `sluice up` and the
//! integration tests so both start them the same way.

use std::path::PathBuf;
use std::process::Command;

/// The tansu binary: `SLUICE_TANSU_BIN`, else `$CARGO_HOME/bin/tansu` (or `~/.cargo/bin/tansu`)
/// if it exists; `None` when neither is there (then `tansu` on PATH is the last resort).
pub fn tansu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_TANSU_BIN") {
        return Some(PathBuf::from(p));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = cargo_home.join("bin/tansu");
    p.is_file().then_some(p)
}

/// The tansu storage URL for `configured` (`local.kafka_storage`): for `sqlite://FILE`, the
/// file's folder is created (tansu opens FILE relative to its working directory).
pub fn tansu_storage(configured: &str) -> String {
    if let Some(rest) = configured.strip_prefix("sqlite://") {
        let file = rest.split('?').next().unwrap_or(rest);
        if let Some(dir) = std::path::Path::new(file).parent()
            && !dir.as_os_str().is_empty()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the broker's storage folder");
        }
    }
    configured.to_string()
}

/// A tansu broker listening on and advertising `host:port`, storing in `storage`
/// (`memory://tansu/` or `sqlite://FILE`).
pub fn tansu_command(addr: &str, storage: &str) -> Command {
    tansu_command_advertising(addr, addr, storage)
}

/// As [`tansu_command`], listening on `listen` while telling clients to connect to `advertised`
/// (a proxy in front of it, say).
pub fn tansu_command_advertising(listen: &str, advertised: &str, storage: &str) -> Command {
    let mut c = Command::new(tansu_binary().unwrap_or_else(|| PathBuf::from("tansu")));
    c.args([
        "broker",
        "--listener-url",
        &format!("tcp://{listen}"),
        "--advertised-listener-url",
        &format!("tcp://{advertised}"),
        "--storage-engine",
        storage,
    ]);
    c
}

/// A throwaway redis-server on 127.0.0.1:`port` that keeps nothing on disk.
pub fn redis_command(port: u16) -> Command {
    let mut c = Command::new("redis-server");
    c.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    c
}
