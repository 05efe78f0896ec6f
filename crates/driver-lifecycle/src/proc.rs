//! Reading process facts from `/proc`.

use std::fs;

/// One process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// Single-letter state: `R`, `S`, `D`, `Z`, `T`, ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
}

/// Parses the content of `/proc/<pid>/stat`. The command name sits in
/// parentheses and may itself contain spaces and parentheses, so fields are
/// read after the last `)`.
pub fn parse_stat(content: &str) -> Option<ProcStat> {
    let open = content.find('(')?;
    let close = content.rfind(')')?;
    let pid = content.get(..open)?.trim().parse().ok()?;
    let mut rest = content.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        pgrp,
    })
}

/// Reads `/proc/<pid>/stat`; `None` when the process is gone.
pub fn stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process whose process group is `pgid`, zombies included.
pub fn group_members(pgid: i32) -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .filter(|p| p.pgrp == pgid)
        .collect()
}

/// Members of the group that are still running (not zombies). A zombie holds
/// no resources but a pid slot and is reaped by its new parent.
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    group_members(pgid)
        .into_iter()
        .filter(|p| p.state != 'Z' && p.state != 'X')
        .map(|p| p.pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let stat = parse_stat("4242 (my (odd) name) S 17 4242 4242 0 -1 4194560").unwrap();
        assert_eq!(
            stat,
            ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 17,
                pgrp: 4242
            }
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_stat("nonsense"), None);
        assert_eq!(parse_stat("12 (x) S notanumber 1"), None);
    }

    #[test]
    fn finds_this_process_in_its_group() {
        let me = i32::try_from(std::process::id()).unwrap();
        let pgid = nix::unistd::getpgrp().as_raw();
        assert!(group_members(pgid).iter().any(|p| p.pid == me));
        assert_eq!(stat(me).unwrap().pgrp, pgid);
    }
}
