//! Kernel NBD devices: attach, re-attach and detach through the `nbd`
//! generic-netlink family ([`netlink`]); read what the kernel says about a
//! device from sysfs ([`sysfs`]).
//!
//! Why netlink and not the ioctls: `NBD_CMD_CONNECT` without an index lets
//! the kernel pick (or create) a free device, so two attaches cannot race
//! for the same `/dev/nbdN`; the backend identifier tags the device so a
//! restarted plugin can tell which volume a device belongs to; and
//! `NBD_CMD_RECONFIGURE` hands a dead device a new socket, which the ioctl
//! interface cannot do. See docs/nbd-netlink.md for what the kernel did in
//! the guest.

pub mod netlink;
pub mod sysfs;

pub use netlink::{
    ClientFlags, ConnectConfig, DeviceStatus, Error, NbdNetlink, ReconfigureConfig, Result,
    NODE_DEAD_CONN_TIMEOUT, NODE_IO_TIMEOUT,
};
