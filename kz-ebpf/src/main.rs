//! kz's kernel programs. Built for `bpfel-unknown-none` by `kz-agent/build.rs`; on the host this
//! file only type-checks so that `cargo check --workspace` works.
//!
//! All programs attach to agent cgroups (one loaded copy, many cgroups); their behaviour for a
//! socket is chosen by the `KZ_POLICY` entry of the calling task's cgroup id. See
//! `kz_agent::intercept` for the user-space side and `kz_common` for the map types.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod progs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
