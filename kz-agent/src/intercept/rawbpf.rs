//! The few bpf(2) commands kz issues itself, for what aya 0.14 cannot do: load and attach
//! cgroup sock_addr programs with the unix attach types (`cgroup/connect_unix`,
//! `cgroup/sendmsg_unix`, Linux >= 6.7), which aya's loader does not know.
//!
//! The programs are compiled with kz's other programs (in placeholder sections aya does know,
//! so it parses them); [`relocated`] takes their instructions from kz's object with the map
//! references resolved against the maps aya created, and [`prog_load`] hands them to the
//! kernel with the right expected attach type.

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_insn};
use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR`
pub const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `bpf_attach_type::BPF_CGROUP_UNIX_CONNECT`
pub const ATTACH_UNIX_CONNECT: u32 = 49;
/// `bpf_attach_type::BPF_CGROUP_UNIX_SENDMSG`
pub const ATTACH_UNIX_SENDMSG: u32 = 50;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum RawBpfError {
    #[error("the kernel refused program {name}: {errno}{}", verifier_tail(.log))]
    Load {
        name: String,
        errno: std::io::Error,
        log: String,
    },
    #[error("bpf({cmd}) failed: {errno}")]
    Command {
        cmd: &'static str,
        #[source]
        errno: std::io::Error,
    },
    #[error("kz's eBPF object: {0}; rebuild kz (`cargo build`)")]
    Object(String),
    #[error("path {0:?} contains a NUL byte")]
    BadPath(std::path::PathBuf),
}

fn verifier_tail(log: &str) -> String {
    // The verifier's conclusion is at the end of its log.
    let lines: Vec<&str> = log.lines().rev().take(12).collect();
    if lines.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = lines.into_iter().rev().collect();
    format!("; verifier: {}", lines.join(" | "))
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of structs of plain integers: all zeroes is a valid value
    // (and the kernel requires unused fields to be zero).
    unsafe { std::mem::zeroed() }
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> Result<i64, std::io::Error> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size passed, and lives for
    // the call; pointers inside it are set up by the callers to buffers that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// The instructions of each program in `names` from `object`, with map references pointing at
/// the file descriptors `map_fd` gives for each map name (every map of the object must have
/// one: aya relocates all functions at once) and calls linked.
pub fn relocated(
    object: &[u8],
    names: &[&str],
    map_fd: impl Fn(&str) -> Option<RawFd>,
) -> Result<Vec<(Vec<bpf_insn>, CString)>, RawBpfError> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| RawBpfError::Object(e.to_string()))?;
    let defs = obj.maps.clone();
    let mut with_fds = Vec::with_capacity(defs.len());
    for (name, def) in &defs {
        let fd = map_fd(name)
            .ok_or_else(|| RawBpfError::Object(format!("no file descriptor for map {name}")))?;
        with_fds.push((name.as_str(), fd, def));
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(with_fds.into_iter(), &text_sections)
        .map_err(|e| RawBpfError::Object(e.to_string()))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| RawBpfError::Object(e.to_string()))?;
    names
        .iter()
        .map(|name| {
            let prog = obj
                .programs
                .get(*name)
                .ok_or_else(|| RawBpfError::Object(format!("no program {name}")))?;
            let func = obj
                .functions
                .get(&prog.function_key())
                .ok_or_else(|| RawBpfError::Object(format!("no code for program {name}")))?;
            Ok((func.instructions.clone(), prog.license.clone()))
        })
        .collect()
}

/// BPF_PROG_LOAD of a cgroup sock_addr program with `attach_type`.
pub fn prog_load(
    name: &str,
    insns: &[bpf_insn],
    license: &CString,
    attach_type: u32,
) -> Result<OwnedFd, RawBpfError> {
    let mut log = vec![0u8; 256 * 1024];
    let mut attr = zeroed_attr();
    // SAFETY: writing the PROG_LOAD member of the zeroed union.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = PROG_TYPE_CGROUP_SOCK_ADDR;
    load.insn_cnt = insns.len() as u32;
    load.insns = insns.as_ptr() as u64;
    load.license = license.as_ptr() as u64;
    load.expected_attach_type = attach_type;
    // The kernel keeps 15 bytes of a program's name.
    for (dst, src) in load.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    load.log_level = 1;
    load.log_size = log.len() as u32;
    load.log_buf = log.as_mut_ptr() as u64;
    match sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(errno) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            Err(RawBpfError::Load {
                name: name.to_owned(),
                errno,
                log: String::from_utf8_lossy(&log[..end]).into_owned(),
            })
        }
    }
}

fn c_path(path: &Path) -> Result<CString, RawBpfError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| RawBpfError::BadPath(path.into()))
}

/// BPF_OBJ_PIN: pins a program or link at `path` in bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), RawBpfError> {
    let p = c_path(path)?;
    let mut attr = zeroed_attr();
    // SAFETY: writing the OBJ_PIN member of the zeroed union.
    let pin = unsafe { &mut attr.__bindgen_anon_4 };
    pin.pathname = p.as_ptr() as u64;
    pin.bpf_fd = fd.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr)
        .map(|_| ())
        .map_err(|errno| RawBpfError::Command {
            cmd: "BPF_OBJ_PIN",
            errno,
        })
}

/// BPF_OBJ_GET: opens what is pinned at `path`.
pub fn obj_get(path: &Path) -> Result<OwnedFd, RawBpfError> {
    let p = c_path(path)?;
    let mut attr = zeroed_attr();
    // SAFETY: writing the OBJ_GET member of the zeroed union.
    let get = unsafe { &mut attr.__bindgen_anon_4 };
    get.pathname = p.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)
        .map(owned)
        .map_err(|errno| RawBpfError::Command {
            cmd: "BPF_OBJ_GET",
            errno,
        })
}

/// BPF_LINK_CREATE: attaches `prog` to the cgroup `target` (no flags: a bpf_link, which
/// coexists with other programs).
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd, RawBpfError> {
    let mut attr = zeroed_attr();
    // SAFETY: writing the LINK_CREATE member of the zeroed union.
    let link = unsafe { &mut attr.link_create };
    link.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    link.__bindgen_anon_2.target_fd = target.as_raw_fd() as u32;
    link.attach_type = attach_type;
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
        .map(owned)
        .map_err(|errno| RawBpfError::Command {
            cmd: "BPF_LINK_CREATE",
            errno,
        })
}

/// The kernel id of a program or link (the second u32 of bpf_prog_info and bpf_link_info).
pub fn obj_id(fd: BorrowedFd<'_>) -> Option<u32> {
    obj_info(fd).map(|info| info[1])
}

/// The id of the program a link runs (the third u32 of bpf_link_info: type, id, prog_id).
pub fn link_prog_id(fd: BorrowedFd<'_>) -> Option<u32> {
    obj_info(fd).map(|info| info[2])
}

/// BPF_OBJ_GET_INFO_BY_FD into a buffer large enough for any info struct's head.
fn obj_info(fd: BorrowedFd<'_>) -> Option<[u32; 64]> {
    let mut info = [0u32; 64];
    let mut attr = zeroed_attr();
    // SAFETY: writing the OBJ_GET_INFO_BY_FD member of the zeroed union; `info` outlives the
    // call and is as large as the length passed.
    let i = unsafe { &mut attr.info };
    i.bpf_fd = fd.as_raw_fd() as u32;
    i.info_len = std::mem::size_of_val(&info) as u32;
    i.info = info.as_mut_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
    Some(info)
}
