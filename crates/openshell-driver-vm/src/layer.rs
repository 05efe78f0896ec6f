//! Each sandbox's writable root filesystem.
//!
//! The image (a cache entry or a local rootfs directory) is shared and
//! never written. A sandbox gets either an overlayfs mount at
//! `<sandbox>/rootfs` with its own `upper/` and `work/` (the default; needs
//! the privilege to mount), or a full private copy of the image in
//! `<sandbox>/rootfs` where overlayfs is unavailable. Either way
//! `<sandbox>/rootfs` is what the guest sees as `/`, and the changes the
//! guest makes survive stop and start until the sandbox is deleted.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::LayerMode;
use crate::error::{Error, Result};
use crate::state::SandboxDir;

/// The kind of writable layer a sandbox was created with. It never changes
/// for the life of the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    Overlay,
    Copy,
}

/// Sets up the writable root of a new sandbox according to `mode` and
/// leaves it ready to boot (mounted, for overlay).
pub fn create(dir: &SandboxDir, lower: &Path, mode: LayerMode) -> Result<LayerKind> {
    match mode {
        LayerMode::Copy => {
            copy_image(lower, &dir.rootfs())?;
            Ok(LayerKind::Copy)
        }
        LayerMode::Overlay => {
            mount_overlay(dir, lower)?;
            Ok(LayerKind::Overlay)
        }
        LayerMode::Auto => match mount_overlay(dir, lower) {
            Ok(()) => Ok(LayerKind::Overlay),
            Err(error) => {
                tracing::warn!(
                    sandbox_id = %dir.id,
                    error = %driver_lifecycle::error_chain(&error),
                    "overlayfs is unavailable; giving the sandbox a full copy of its image instead"
                );
                let _ = std::fs::remove_dir(dir.upper());
                let _ = std::fs::remove_dir(dir.work());
                let _ = std::fs::remove_dir(dir.rootfs());
                copy_image(lower, &dir.rootfs())?;
                Ok(LayerKind::Copy)
            }
        },
    }
}

/// Makes the root of an existing sandbox ready to boot again.
pub fn activate(dir: &SandboxDir, lower: &Path, kind: LayerKind) -> Result<()> {
    match kind {
        LayerKind::Copy => {
            if dir.rootfs().is_dir() {
                Ok(())
            } else {
                Err(Error::FailedPrecondition(format!(
                    "the sandbox's root copy {} is missing",
                    dir.rootfs().display()
                )))
            }
        }
        LayerKind::Overlay => {
            if is_mount_point(&dir.rootfs()) {
                // Left mounted by a driver that was killed; the upper layer
                // is the same, so the mount can be kept.
                return Ok(());
            }
            mount_overlay(dir, lower)
        }
    }
}

/// Unmounts the sandbox root if it is mounted. Copies are left alone.
pub fn deactivate(dir: &SandboxDir) -> Result<()> {
    let target = dir.rootfs();
    if !is_mount_point(&target) {
        return Ok(());
    }
    use nix::mount::{MntFlags, umount2};
    match umount2(&target, MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(&target, MntFlags::MNT_DETACH)
            .map_err(|e| Error::io("unmount", &target, e.into())),
        Err(e) => Err(Error::io("unmount", &target, e.into())),
    }
}

fn mount_overlay(dir: &SandboxDir, lower: &Path) -> Result<()> {
    for path in [lower, dir.path()] {
        let text = path.to_string_lossy();
        if text.contains([',', ':', '\\']) {
            return Err(Error::FailedPrecondition(format!(
                "cannot use {} in an overlayfs mount: the path contains ',', ':' or '\\'; move \
                 the state directory or image to a plain path",
                path.display()
            )));
        }
    }
    for sub in [dir.upper(), dir.work(), dir.rootfs()] {
        match std::fs::create_dir(&sub) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create", &sub, e)),
        }
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        dir.upper().display(),
        dir.work().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &dir.rootfs(),
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| Error::io("mount overlayfs at", dir.rootfs(), e.into()))
}

/// Copies the image tree to `target` with `cp -a` (ownership, modes,
/// links, device nodes and extended attributes kept; reflinks where the
/// filesystem has them).
fn copy_image(lower: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir(target).map_err(|e| Error::io("create", target, e))?;
    let mut source = lower.as_os_str().to_owned();
    source.push("/.");
    let output = std::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(&source)
        .arg(target)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::Spawn {
            program: "cp".into(),
            source: e,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Tool {
            tool: format!("cp -a {} {}", lower.display(), target.display()),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Whether `path` is the mount point of a mount in this mount namespace.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(canonical) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mount_points(&mountinfo).any(|p| Path::new(&p) == canonical)
}

/// Mount points listed in a mountinfo text (field 5), unescaped.
fn mount_points(mountinfo: &str) -> impl Iterator<Item = String> + '_ {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape_octal))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && bytes
                .get(i + 1..i + 4)
                .is_some_and(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0_u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SandboxId;
    use crate::state::StateDir;

    #[test]
    fn mountinfo_fields_are_unescaped() {
        let info = "36 35 98:0 /mnt1 /mnt/with\\040space rw - ext3 /dev/root rw\n\
                    37 35 98:0 / /plain rw - ext4 /dev/vda rw\n";
        let points: Vec<String> = mount_points(info).collect();
        assert_eq!(points, ["/mnt/with space", "/plain"]);
        assert_eq!(unescape_octal("a\\134b"), "a\\b");
        assert_eq!(unescape_octal("trailing\\"), "trailing\\");
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_dir_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let tmp = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(tmp.path()));
        assert!(!is_mount_point(&tmp.path().join("missing")));
    }

    fn sandbox(tmp: &Path) -> (SandboxDir, std::path::PathBuf) {
        let state = StateDir::new(tmp.join("state"));
        state.prepare().unwrap();
        let dir = state.sandbox(&SandboxId::parse("s").unwrap());
        dir.create().unwrap();
        let lower = tmp.join("image");
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::write(lower.join("etc/hostname"), b"image\n").unwrap();
        std::os::unix::fs::symlink("hostname", lower.join("etc/link")).unwrap();
        (dir, lower)
    }

    #[test]
    fn copy_layer_is_private_and_keeps_links() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, lower) = sandbox(tmp.path());
        assert_eq!(
            create(&dir, &lower, LayerMode::Copy).unwrap(),
            LayerKind::Copy
        );
        std::fs::write(dir.rootfs().join("etc/hostname"), b"changed\n").unwrap();
        assert_eq!(
            std::fs::read(lower.join("etc/hostname")).unwrap(),
            b"image\n"
        );
        assert_eq!(
            std::fs::read_link(dir.rootfs().join("etc/link")).unwrap(),
            Path::new("hostname")
        );
        activate(&dir, &lower, LayerKind::Copy).unwrap();
        deactivate(&dir).unwrap();
    }

    // Mounting needs CAP_SYS_ADMIN; where it is missing the test says so.
    #[test]
    fn overlay_layer_keeps_changes_across_remounts() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, lower) = sandbox(tmp.path());
        let kind = create(&dir, &lower, LayerMode::Auto).unwrap();
        if kind == LayerKind::Copy {
            eprintln!(
                "skipped: overlayfs cannot be mounted here (no privilege); copy fallback used"
            );
            return;
        }
        assert!(is_mount_point(&dir.rootfs()));
        std::fs::write(dir.rootfs().join("etc/hostname"), b"changed\n").unwrap();
        std::fs::write(dir.rootfs().join("new"), b"new\n").unwrap();
        deactivate(&dir).unwrap();
        assert!(!is_mount_point(&dir.rootfs()));
        assert!(dir.upper().join("new").exists(), "changes live in upper/");
        assert_eq!(
            std::fs::read(lower.join("etc/hostname")).unwrap(),
            b"image\n"
        );
        activate(&dir, &lower, LayerKind::Overlay).unwrap();
        activate(&dir, &lower, LayerKind::Overlay).unwrap();
        assert_eq!(
            std::fs::read(dir.rootfs().join("etc/hostname")).unwrap(),
            b"changed\n"
        );
        deactivate(&dir).unwrap();
        deactivate(&dir).unwrap();
        dir.remove_all().unwrap();
    }

    #[test]
    fn auto_falls_back_to_a_copy_when_overlay_cannot_be_mounted() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, lower) = sandbox(tmp.path());
        // A comma cannot be expressed in overlayfs options, so the mount
        // fails on any host; auto must still give the sandbox a root.
        let odd = tmp.path().join("image,v2");
        std::fs::rename(&lower, &odd).unwrap();
        assert_eq!(
            create(&dir, &odd, LayerMode::Auto).unwrap(),
            LayerKind::Copy
        );
        assert!(!is_mount_point(&dir.rootfs()));
        assert_eq!(
            std::fs::read(dir.rootfs().join("etc/hostname")).unwrap(),
            b"image\n"
        );
        assert!(
            !dir.upper().exists() && !dir.work().exists(),
            "no overlay leftovers"
        );
    }

    #[test]
    fn paths_that_break_overlay_options_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = sandbox(tmp.path());
        let odd = tmp.path().join("a,b");
        std::fs::create_dir(&odd).unwrap();
        let err = create(&dir, &odd, LayerMode::Overlay)
            .unwrap_err()
            .to_string();
        assert!(err.contains("contains ','"), "{err}");
    }
}
