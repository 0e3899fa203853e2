//! The freestanding vshm guest's driver and command interpreter, `no_std` and free of the
//! machine: everything reaches the hardware through [`hw::Hw`], which the guest binary
//! (src/main.rs) implements on x86 and the tests implement with a simulated device.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod commands;
pub mod device;
pub mod hw;
pub mod line;
pub mod parse;
pub mod pci;
#[cfg(test)]
mod sim;
pub mod virtqueue;
