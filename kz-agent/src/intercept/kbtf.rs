//! Struct layouts from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya's Rust programs get no CO-RE relocations: the unix-socket programs read
//! `struct bpf_sock_addr_kern` (the kernel's own context of sock_addr programs) at fixed
//! offsets, and [`check_sock_addr_kern`] makes sure this kernel lays it out that way before they
//! are attached. This is a small reader of just what that needs (struct and union members,
//! through anonymous members), not a general BTF library.

use std::collections::HashMap;
use std::path::Path;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Why the offsets could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read the kernel's BTF at {path}: {source}; unix-socket rules need a kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's BTF is malformed ({0}); unix-socket rules cannot be enforced here")]
    Malformed(&'static str),
    #[error(
        "the kernel's BTF has no {0}: this kernel's layout is not one kz knows how to read; unix-socket rules cannot be enforced here"
    )]
    NoField(String),
}

struct Member {
    name: u32,
    ty: u32,
    /// Bit offset.
    offset: u32,
}

struct Type {
    kind: u32,
    name: u32,
    /// Referenced type for typedef/const/volatile/...
    ty: u32,
    members: Vec<Member>,
}

/// The parsed type section: enough to find struct members.
pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// Index 0 is the void type.
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u32_at(d: &[u8], o: usize) -> Result<u32, BtfError> {
    d.get(o..o + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(data)
    }

    /// Parses little-endian BTF (the only byte order of the kernels kz runs on).
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("no header"))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (or big-endian)"));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let start = hdr_len + type_off;
        let end = start + type_len;
        if end > data.len() || hdr_len + str_off + str_len > data.len() {
            return Err(BtfError::Malformed("sections out of bounds"));
        }
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut p = start;
        while p < end {
            let name = u32_at(&data, p)?;
            let info = u32_at(&data, p + 4)?;
            let size_or_type = u32_at(&data, p + 8)?;
            p += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let bitfields = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                1 | 14 | 17 => p += 4, // int, var, decl_tag
                3 => p += 12,          // array
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(&data, p + 8)?;
                        members.push(Member {
                            name: u32_at(&data, p)?,
                            ty: u32_at(&data, p + 4)?,
                            // With kind_flag the top 8 bits are a bitfield size.
                            offset: if bitfields {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                        p += 12;
                    }
                }
                6 | 13 => p += 8 * vlen,   // enum, func_proto
                15 | 19 => p += 12 * vlen, // datasec, enum64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => {} // no extra data
                _ => return Err(BtfError::Malformed("unknown type kind")),
            }
            types.push(Type {
                kind,
                name,
                ty: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            data,
            strings: hdr_len + str_off,
            strings_len: str_len,
            types,
            structs: HashMap::new(),
        };
        let mut structs = HashMap::new();
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let name = btf.string(t.name).to_owned();
                // The first definition wins (vmlinux BTF is deduplicated; modules come later).
                structs.entry(name).or_insert(id as u32);
            }
        }
        btf.structs = structs;
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let start = self.strings + off as usize;
        let end_limit = self.strings + self.strings_len;
        let bytes = self.data.get(start..end_limit).unwrap_or(&[]);
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `field` in struct/union type `t`, searching anonymous members too.
    fn find(&self, t: &Type, field: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name != 0 && self.string(m.name) == field {
                return Some(m.offset / 8);
            }
        }
        for m in t.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolve(m.ty)?;
            if (inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                && let Some(off) = self.find(inner, field, depth + 1)
            {
                return Some(m.offset / 8 + off);
            }
        }
        None
    }

    /// Byte offset of `path` ("a.b.c": nested members) in `struct name`.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::NoField(format!("struct {name}::{path}"));
        let mut t = self
            .structs
            .get(name)
            .and_then(|id| self.types.get(*id as usize))
            .ok_or_else(missing)?;
        let mut total = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            total += self.find(t, part, 0).ok_or_else(missing)?;
            if parts.peek().is_some() {
                let member = self.member_type(t, part).ok_or_else(missing)?;
                t = member;
            }
        }
        Ok(total)
    }

    /// The (resolved) type of member `field` of `t`, searching anonymous members too.
    fn member_type(&self, t: &Type, field: &str) -> Option<&Type> {
        for m in &t.members {
            if m.name != 0 && self.string(m.name) == field {
                return self.resolve(m.ty);
            }
        }
        t.members
            .iter()
            .filter(|m| m.name == 0)
            .filter_map(|m| self.resolve(m.ty))
            .find_map(|inner| self.member_type(inner, field))
    }
}

pub use kz_common::{SOCK_ADDR_KERN_UADDR, SOCK_ADDR_KERN_UADDRLEN};

/// Whether this kernel's `struct bpf_sock_addr_kern` has `uaddr` and `uaddrlen` where the
/// unix-socket programs read them.
pub fn check_sock_addr_kern(btf: &Btf) -> Result<(), BtfError> {
    let uaddr = btf.offset("bpf_sock_addr_kern", "uaddr")?;
    let uaddrlen = btf.offset("bpf_sock_addr_kern", "uaddrlen")?;
    if (uaddr, uaddrlen) != (SOCK_ADDR_KERN_UADDR, SOCK_ADDR_KERN_UADDRLEN) {
        return Err(BtfError::NoField(format!(
            "struct bpf_sock_addr_kern with uaddr at {SOCK_ADDR_KERN_UADDR} and uaddrlen at {SOCK_ADDR_KERN_UADDRLEN} (this kernel: {uaddr}, {uaddrlen})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_kernels_layout() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("SKIPPED: no {VMLINUX_BTF} on this machine");
            return;
        };
        // Nested and anonymous members resolve: unix_sock embeds sock first, dentry keeps
        // d_name in an anonymous union, qstr's name follows its 8-byte hash_len.
        assert_eq!(btf.offset("unix_sock", "sk").expect("sk"), 0);
        let d_name = btf.offset("dentry", "d_name").expect("d_name");
        assert_eq!(
            btf.offset("dentry", "d_name.name").expect("name"),
            d_name + 8
        );
        assert!(btf.offset("unix_sock", "no_such_field").is_err());
        assert!(btf.offset("no_such_struct", "x").is_err());
        if btf.offset("bpf_sock_addr_kern", "uaddrlen").is_ok() {
            check_sock_addr_kern(&btf).expect("the layout the programs read");
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Btf::parse(vec![1, 2, 3]),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            Btf::parse(Vec::new()),
            Err(BtfError::Malformed(_))
        ));
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        hdr.extend_from_slice(&24u32.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&1000u32.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(Btf::parse(hdr), Err(BtfError::Malformed(_))));
    }
}
