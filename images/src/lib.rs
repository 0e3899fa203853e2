//! Test guests for vshm: building a bootable image from Debian packages ([`image`]) and
//! running it under QEMU attached to vshmd, driven through a command agent ([`vm`]); the
//! freestanding guest of the VMM ([`freestanding`]).
#![warn(missing_docs)]

pub mod cpio;
pub mod freestanding;
pub mod image;
pub mod lines;
pub mod vm;

pub use image::{build, out_dir, Image, ImageError};
pub use vm::{accelerator, Accel, GuestNet, Output, Starting, Vm, VmConfig, VmError};
