//! Every libkrun call of the project, behind a safe interface.
//!
//! The `libkrun` crate is linked statically; its C API functions are Rust
//! items (`krun::krun_*`). Each returns a negative errno on failure, which
//! becomes [`Error::Krun`] naming the call. A context lives in libkrun's
//! process-global map; [`start_enter`] consumes it and only returns if the
//! VM could not be started — once the guest runs, libkrun owns the process
//! and ends it with the guest's exit code.
//!
//! Only the VMM child (`openshell-driver-vm vmm`) uses this module.
#![expect(
    unsafe_code,
    reason = "the libkrun C API is only reachable through unsafe calls; each has a SAFETY note"
)]

use std::ffi::{CString, c_char};
use std::os::fd::RawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// How many pointers libkrun reads from an argv or envp array, whatever
/// the position of the terminating NULL (`MAX_ARGS` in libkrun).
const KRUN_ARRAY_LEN: usize = 4096;

fn check(call: &'static str, rc: i32) -> Result<()> {
    if rc < 0 {
        Err(Error::Krun {
            call,
            errno: rc.saturating_neg(),
        })
    } else {
        Ok(())
    }
}

fn c_string(call: &'static str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| Error::Krun {
        call,
        errno: libc::EINVAL,
    })
}

fn c_path(call: &'static str, path: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Krun {
        call,
        errno: libc::EINVAL,
    })
}

/// A NULL-terminated array of C strings padded with NULLs to the length
/// libkrun reads. The strings must outlive every use of the pointers.
struct CArray {
    _strings: Vec<CString>,
    pointers: Vec<*const c_char>,
}

impl CArray {
    fn new(call: &'static str, items: &[String]) -> Result<Self> {
        if items.len() >= KRUN_ARRAY_LEN {
            return Err(Error::Krun {
                call,
                errno: libc::E2BIG,
            });
        }
        let strings = items
            .iter()
            .map(|s| c_string(call, s))
            .collect::<Result<Vec<_>>>()?;
        let mut pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.resize(KRUN_ARRAY_LEN, std::ptr::null());
        Ok(Self {
            _strings: strings,
            pointers,
        })
    }
}

/// libkrun's guest init (`init.krun`, built from the libkrun crate's
/// sources), as the bytes libkrun injects at `/init.krun`. The QEMU
/// executor writes the same bytes into the guest root, so both backends run
/// the guest command through one init.
pub fn default_init() -> Result<&'static [u8]> {
    let mut data: *const u8 = std::ptr::null();
    let mut len: libc::size_t = 0;
    // SAFETY: both out-pointers point at live locals of the right type.
    check("krun_get_default_init", unsafe {
        krun::krun_get_default_init(&raw mut data, &raw mut len)
    })?;
    if data.is_null() || len == 0 {
        return Err(Error::Krun {
            call: "krun_get_default_init",
            errno: libc::ENOENT,
        });
    }
    // SAFETY: libkrun returned a pointer to its embedded init blob, a
    // static of `len` bytes that lives as long as the process and is never
    // written.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// A libkrun configuration context.
#[derive(Debug)]
pub struct Context {
    id: u32,
}

impl Context {
    pub fn new() -> Result<Self> {
        let rc = krun::krun_create_ctx();
        check("krun_create_ctx", rc)?;
        let id = u32::try_from(rc).map_err(|_| Error::Krun {
            call: "krun_create_ctx",
            errno: libc::ERANGE,
        })?;
        Ok(Self { id })
    }

    pub fn set_vm_config(&self, vcpus: u8, mem_mib: u32) -> Result<()> {
        check(
            "krun_set_vm_config",
            krun::krun_set_vm_config(self.id, vcpus, mem_mib),
        )
    }

    /// Shares `dir` as the guest root under libkrun's own tag, with
    /// libkrun's init injected (for libkrunfw kernels, which find their root
    /// by that tag).
    pub fn set_root(&self, dir: &Path) -> Result<()> {
        let dir = c_path("krun_set_root", dir)?;
        // SAFETY: `dir` is a valid NUL-terminated string for the duration
        // of the call; libkrun copies it.
        check("krun_set_root", unsafe {
            krun::krun_set_root(self.id, dir.as_ptr())
        })
    }

    /// Shares `dir` under `tag` and injects libkrun's init at `/init.krun`
    /// in it, for kernels booted with `root=<tag>`.
    pub fn set_root_with_tag(&self, tag: &str, dir: &Path) -> Result<()> {
        let c_tag = c_string("krun_add_virtiofs", tag)?;
        let c_dir = c_path("krun_add_virtiofs", dir)?;
        // SAFETY: both strings are valid and NUL-terminated for the call;
        // libkrun copies them.
        check("krun_add_virtiofs", unsafe {
            krun::krun_add_virtiofs(self.id, c_tag.as_ptr(), c_dir.as_ptr())
        })?;
        let mut data: *const u8 = std::ptr::null();
        let mut len: libc::size_t = 0;
        // SAFETY: both out-pointers point at live locals of the right type.
        check("krun_get_default_init", unsafe {
            krun::krun_get_default_init(&raw mut data, &raw mut len)
        })?;
        let name = c_string("krun_fs_add_overlay_file", "init.krun")?;
        // SAFETY: the strings are valid for the call. `data`/`len` describe
        // libkrun's embedded init, a static that lives as long as the
        // process, which satisfies the "valid for the VM's lifetime" rule.
        check("krun_fs_add_overlay_file", unsafe {
            krun::krun_fs_add_overlay_file(
                self.id,
                c_tag.as_ptr(),
                name.as_ptr(),
                data,
                len,
                0o755,
                true,
            )
        })
    }

    /// Adds a read-only virtual file to the filesystem `tag`, creating the
    /// virtual directory `dir` at its root first. The file never touches the
    /// host disk.
    pub fn add_virtual_file(
        &self,
        tag: &str,
        dir: &str,
        name: &str,
        data: &'static [u8],
        mode: u32,
    ) -> Result<()> {
        let c_tag = c_string("krun_fs_add_overlay_dir", tag)?;
        let c_dir = c_string("krun_fs_add_overlay_dir", dir)?;
        // SAFETY: the strings are valid and NUL-terminated for the call.
        check("krun_fs_add_overlay_dir", unsafe {
            krun::krun_fs_add_overlay_dir(self.id, c_tag.as_ptr(), c_dir.as_ptr(), 0o755)
        })?;
        let c_file = c_string("krun_fs_add_overlay_file", &format!("{dir}/{name}"))?;
        // SAFETY: the strings are valid for the call; `data` is 'static, so
        // it outlives the VM as libkrun requires.
        check("krun_fs_add_overlay_file", unsafe {
            krun::krun_fs_add_overlay_file(
                self.id,
                c_tag.as_ptr(),
                c_file.as_ptr(),
                data.as_ptr(),
                data.len(),
                mode,
                false,
            )
        })
    }

    /// Boots `path` as an ELF vmlinux with exactly this kernel command line
    /// (libkrun appends its own `KRUN_*` variables, the environment and the
    /// arguments).
    pub fn set_elf_kernel(&self, path: &Path, cmdline: &str) -> Result<()> {
        let c_kernel = c_path("krun_set_kernel", path)?;
        let c_cmdline = c_string("krun_set_kernel", cmdline)?;
        // SAFETY: the strings are valid for the call and libkrun copies them;
        // a NULL initramfs is documented as "none". Format 1 is ELF.
        check("krun_set_kernel", unsafe {
            krun::krun_set_kernel(
                self.id,
                c_kernel.as_ptr(),
                1,
                std::ptr::null(),
                c_cmdline.as_ptr(),
            )
        })
    }

    /// The guest command: `exec` with `args` (after the program name) and
    /// exactly the environment `env` (`KEY=VALUE`).
    pub fn set_exec(&self, exec: &str, args: &[String], env: &[String]) -> Result<()> {
        let c_exec = c_string("krun_set_exec", exec)?;
        let argv = CArray::new("krun_set_exec", args)?;
        let envp = CArray::new("krun_set_exec", env)?;
        // SAFETY: `c_exec` is valid; `argv` and `envp` each hold
        // KRUN_ARRAY_LEN pointers (libkrun reads exactly that many) to
        // strings that live until the end of this function, NULL after the
        // last item. libkrun copies everything it keeps.
        check("krun_set_exec", unsafe {
            krun::krun_set_exec(
                self.id,
                c_exec.as_ptr(),
                argv.pointers.as_ptr(),
                envp.pointers.as_ptr(),
            )
        })
    }

    pub fn set_workdir(&self, dir: &str) -> Result<()> {
        let c_dir = c_string("krun_set_workdir", dir)?;
        // SAFETY: valid NUL-terminated string, copied by libkrun.
        check("krun_set_workdir", unsafe {
            krun::krun_set_workdir(self.id, c_dir.as_ptr())
        })
    }

    /// Sends the guest console (hvc0) to `path`.
    pub fn set_console_output(&self, path: &Path) -> Result<()> {
        let c_path = c_path("krun_set_console_output", path)?;
        // SAFETY: valid NUL-terminated string, copied by libkrun.
        check("krun_set_console_output", unsafe {
            krun::krun_set_console_output(self.id, c_path.as_ptr())
        })
    }

    /// Adds a legacy serial port (ttyS0) whose output goes to `output`.
    /// libkrun takes ownership of the descriptor.
    pub fn add_serial_console(&self, output: std::os::fd::OwnedFd) -> Result<()> {
        use std::os::fd::IntoRawFd as _;
        let fd: RawFd = output.into_raw_fd();
        // SAFETY: no input (-1); `fd` is an open descriptor whose ownership
        // passes to libkrun, which wraps it in a File.
        check("krun_add_serial_console_default", unsafe {
            krun::krun_add_serial_console_default(self.id, -1, fd)
        })
    }

    /// A virtio-net NIC whose frames travel over the connected stream
    /// socket `socket` (one end of a socket pair whose other end passt
    /// holds), with libkrun's init running a DHCP client on it at boot.
    /// libkrun takes ownership of the descriptor.
    pub fn add_passt_nic(&self, socket: std::os::fd::OwnedFd) -> Result<()> {
        use std::os::fd::IntoRawFd as _;
        // A locally administered unicast address: 02 in the first octet.
        const MAC: [u8; 6] = [0x02, 0x6f, 0x73, 0x00, 0x00, 0x01];
        // libkrun's NET_FEATURE_* bits: CSUM, GUEST_CSUM, GUEST_TSO4,
        // GUEST_UFO, HOST_TSO4 and HOST_UFO, the set passt is used with
        // through libkrun's older passt call.
        const FEATURES: u32 = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 10) | (1 << 11) | (1 << 14);
        // libkrun's NET_FLAG_DHCP_CLIENT.
        const DHCP_CLIENT: u32 = 1 << 1;
        let fd: RawFd = socket.into_raw_fd();
        // SAFETY: a NULL path with a valid descriptor selects the
        // descriptor backend; `MAC` is a 6-byte static that libkrun copies
        // during the call; the descriptor's ownership passes to libkrun.
        check("krun_add_net_unixstream", unsafe {
            krun::krun_add_net_unixstream(
                self.id,
                std::ptr::null(),
                fd,
                MAC.as_ptr(),
                FEATURES,
                DHCP_CLIENT,
            )
        })
    }

    /// No vsock device, hence no TSI networking.
    pub fn disable_vsock(&self) -> Result<()> {
        check(
            "krun_disable_implicit_vsock",
            krun::krun_disable_implicit_vsock(self.id),
        )
    }

    /// Builds and starts the VM. Never returns on success: libkrun runs the
    /// VM on this thread and exits the process when the guest stops.
    pub fn start_enter(self) -> Error {
        let rc = krun::krun_start_enter(self.id);
        Error::Krun {
            call: "krun_start_enter",
            errno: if rc < 0 {
                rc.saturating_neg()
            } else {
                libc::EIO
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Configuration calls only fill libkrun's context map; nothing here
    // needs KVM.
    #[test]
    fn configuration_calls_succeed_and_errors_carry_the_call() {
        let ctx = Context::new().unwrap();
        ctx.set_vm_config(1, 128).unwrap();
        ctx.set_root_with_tag("openshell-root", Path::new("/tmp"))
            .unwrap();
        ctx.add_virtual_file("openshell-root", ".openshell", "token", b"t\n", 0o400)
            .unwrap();
        ctx.set_workdir("/").unwrap();
        ctx.set_exec("/bin/sh", &["-c".into(), "true".into()], &["A=b".into()])
            .unwrap();
        ctx.set_console_output(Path::new("/proc/self/fd/1"))
            .unwrap();
        let again = ctx.set_console_output(Path::new("/tmp/x")).unwrap_err();
        assert!(matches!(
            again,
            Error::Krun {
                call: "krun_set_console_output",
                errno: libc::EINVAL
            }
        ));
    }

    #[test]
    fn a_passt_nic_is_accepted_on_a_socket() {
        let ctx = Context::new().unwrap();
        ctx.set_vm_config(1, 128).unwrap();
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ctx.add_passt_nic(ours.into()).unwrap();
        ctx.disable_vsock().unwrap();
    }

    #[test]
    fn interior_nul_and_oversized_arrays_are_rejected_before_libkrun() {
        let ctx = Context::new().unwrap();
        assert!(ctx.set_workdir("a\0b").is_err());
        let many = vec!["x".to_owned(); KRUN_ARRAY_LEN];
        let err = ctx.set_exec("/bin/true", &many, &[]).unwrap_err();
        assert!(matches!(
            err,
            Error::Krun {
                errno: libc::E2BIG,
                ..
            }
        ));
    }

    #[test]
    fn the_embedded_init_is_a_static_elf() {
        let init = default_init().unwrap();
        assert!(
            init.starts_with(b"\x7fELF"),
            "init.krun is an ELF executable"
        );
    }

    #[test]
    fn unknown_filesystem_tag_is_enoent() {
        let ctx = Context::new().unwrap();
        let err = ctx
            .add_virtual_file("nope", ".openshell", "x", b"x", 0o400)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Krun {
                    errno: libc::ENOENT,
                    ..
                }
            ),
            "{err}"
        );
    }
}
