//! vmtest-core: the part of vmtest that knows no hypervisor.
//!
//! A backend implements [`Hypervisor`] and [`Vm`]; the run loop, errors, state records,
//! console handling and the guest agent's protocol live here.

pub mod protocol;

#[cfg(feature = "host")]
pub mod cancel;
#[cfg(feature = "host")]
pub mod checkpoint;
#[cfg(feature = "host")]
pub mod config;
#[cfg(feature = "host")]
pub mod console;
#[cfg(feature = "host")]
pub mod environment;
#[cfg(feature = "host")]
pub mod error;
#[cfg(feature = "host")]
pub mod events;
#[cfg(feature = "host")]
pub mod exec;
#[cfg(feature = "host")]
pub mod hypervisor;
#[cfg(feature = "host")]
pub mod junit;
#[cfg(feature = "host")]
pub mod kernel_log;
pub mod kernel_report;
#[cfg(feature = "host")]
pub mod lock;
#[cfg(feature = "host")]
pub mod machine;
#[cfg(feature = "host")]
pub mod network;
#[cfg(feature = "host")]
pub mod plan;
#[cfg(feature = "host")]
pub mod random;
#[cfg(feature = "host")]
pub mod registry;
#[cfg(feature = "host")]
pub mod retry;
#[cfg(feature = "host")]
pub mod runner;
#[cfg(feature = "host")]
pub mod shell;
#[cfg(feature = "host")]
pub mod spec;
#[cfg(feature = "host")]
pub mod state;
#[cfg(feature = "host")]
pub mod suite;
#[cfg(feature = "host")]
pub mod sweep;
#[cfg(feature = "host")]
pub mod testfile;
#[cfg(feature = "host")]
pub mod testrun;

#[cfg(feature = "host")]
pub use error::{Error, ErrorKind, Result};
#[cfg(feature = "host")]
pub use hypervisor::{Capabilities, Check, CheckStatus, Hypervisor, Preflight, Vm};
pub use protocol::ExitStatus;
