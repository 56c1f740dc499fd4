//! The local stack's processes as `sluice bench` sees them: which kind each is (gateway,
//! workers, broker, Redis), found by command line, and the CPU time they used.

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub(crate) fn ticks_per_s() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Which kind of process a pid is, by its command line.
pub(crate) fn process_kind(pid: u32) -> Option<&'static str> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    let exe = *args.first()?;
    let has = |w: &[u8]| args.contains(&w);
    // `sluice`, or a renamed copy such as `sluice-before` (comparing builds).
    let name = exe.rsplit(|b| *b == b'/').next().unwrap_or(exe);
    let sluice = name.starts_with(b"sluice");
    if sluice && has(b"gateway") {
        Some("gateway")
    } else if sluice && has(b"worker") {
        Some("workers")
    } else if sluice && has(b"learn") {
        Some("learners")
    } else if has(b"kafka.Kafka") {
        Some("broker")
    } else if exe.ends_with(b"redis-server") || exe.starts_with(b"redis-server") {
        Some("redis")
    } else {
        None
    }
}

/// Pids of processes of `kind` on this machine.
pub(crate) fn pids_of(kind: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && process_kind(*pid) == Some(kind))
        .collect()
}

/// Pids of running `sluice gateway` and `sluice worker` processes.
pub(crate) fn sluice_pids() -> Vec<u32> {
    let mut p = pids_of("gateway");
    p.extend(pids_of("workers"));
    p
}

/// Total user+system clock ticks of `pids`.
pub(crate) fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after_comm = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = after_comm.split(' ').collect();
            // Fields 14 and 15 of /proc/pid/stat (utime, stime) are 11 and 12 after the comm field.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Ticks the hypervisor ran other guests while this machine's CPUs wanted to run (the `steal`
/// column of `/proc/stat`'s `cpu` line, summed over CPUs); 0 where unknown.
pub(crate) fn steal_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    stat.lines()
        .next()
        .and_then(|cpu| cpu.split_whitespace().nth(8)?.parse().ok())
        .unwrap_or(0)
}
