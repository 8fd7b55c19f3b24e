//! Types shared by the kz eBPF programs (`kz-ebpf`) and the user-space loader (`kz-agent`).
//!
//! Everything here is `#[repr(C)]` plain data: it crosses the kernel/user boundary as map keys
//! and values, so field order and padding are part of the ABI.
#![no_std]
#![forbid(unsafe_code)]
