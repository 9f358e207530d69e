//! The r3map-csi node plugin: attaches volumes as kernel NBD devices
//! (`/dev/nbdN`) whose other end the r3map engine serves from user space.

pub mod demo;
pub mod device;
pub mod metrics;
pub mod plugin;
