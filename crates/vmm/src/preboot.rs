//! Before boot: a VM configured through the API, as Firecracker's is
//! (`faultline run --api-sock S --boot-via-api`).
//!
//! The API server is started on the same channel the running VM's controller will read, so a
//! client sees one socket throughout: before `PUT /actions {"action_type":"InstanceStart"}`
//! it may add devices (`PUT /drives/{id}`, `/network-interfaces/{id}`, `/vsock`,
//! `/entropy`) and read the configuration (`GET /vm`, state `not_started`); the start
//! builds the VM (a bad configuration is answered 400 and the VM can still be fixed and
//! started), and from then on the same socket reaches the running VM's controller.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{VirtioSpec, VmConfig};
use crate::controller::{
    Command, ControlError, ControlHandle, Msg, Response, RunError, RunState, RunningVm, VmInfo,
    channel,
};
use crate::vstate::{Notifier, Vm};

/// Waiting for the start failed.
#[derive(Debug, Error)]
pub enum PreBootError {
    /// Nobody started the VM in time.
    #[error("the VM was not started through the API within {0:?}")]
    Timeout(Duration),
    /// The operator stopped it before it booted.
    #[error("stopped through the API before boot")]
    Stopped,
    /// The VM was built but could not start.
    #[error("starting the VM")]
    Start(#[source] RunError),
}

/// A VM waiting for its configuration and its start.
pub struct PreBoot {
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    notify: Notifier,
}

impl Default for PreBoot {
    fn default() -> Self {
        Self::new()
    }
}

/// The order devices take on the bus: disks, network interfaces, vsock, entropy.
fn bus_order(s: &VirtioSpec) -> u8 {
    match s {
        VirtioSpec::Block { .. } => 0,
        VirtioSpec::Net { .. } => 1,
        VirtioSpec::Vsock { .. } => 2,
        VirtioSpec::Rng => 3,
    }
}

/// The names the command line's devices get (`drive0`, `net0`, `vsock`, `entropy`).
fn default_ids(specs: &[VirtioSpec]) -> Vec<(String, VirtioSpec)> {
    let (mut d, mut n) = (0, 0);
    specs
        .iter()
        .map(|s| {
            let id = match s {
                VirtioSpec::Block { .. } => {
                    d += 1;
                    format!("drive{}", d - 1)
                }
                VirtioSpec::Net { .. } => {
                    n += 1;
                    format!("net{}", n - 1)
                }
                VirtioSpec::Vsock { .. } => "vsock".into(),
                VirtioSpec::Rng => "entropy".into(),
            };
            (id, s.clone())
        })
        .collect()
}

impl PreBoot {
    /// A channel for the API server and, later, the controller.
    pub fn new() -> PreBoot {
        let (tx, rx, notify) = channel();
        PreBoot { tx, rx, notify }
    }

    /// What the API server sends to (valid before and after boot).
    pub fn handle(&self) -> ControlHandle {
        ControlHandle(self.tx.clone())
    }

    /// Answer the API until a start succeeds (or `deadline` passes, or a stop); returns the
    /// running VM, whose controller then answers the same API.
    pub fn run(self, base: VmConfig, deadline: Duration) -> Result<RunningVm, PreBootError> {
        let t0 = Instant::now();
        let mut devices = default_ids(&base.virtio);
        let config = |devices: &[(String, VirtioSpec)]| {
            let mut cfg = base.clone();
            let mut v: Vec<VirtioSpec> = devices.iter().map(|d| d.1.clone()).collect();
            v.sort_by_key(bus_order);
            cfg.virtio = v;
            cfg
        };
        loop {
            let left = deadline.saturating_sub(t0.elapsed());
            let (cmd, reply) = match self.rx.recv_timeout(left) {
                Ok(Msg::Command(c, r)) => (c, r),
                Ok(Msg::Notice(_)) => continue,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(PreBootError::Timeout(deadline));
                }
            };
            let answer = match cmd {
                Command::GetVm => Ok(Response::Vm(VmInfo {
                    state: RunState::NotStarted,
                    paused_by: Vec::new(),
                    config: config(&devices),
                })),
                Command::PutDevice { id, spec } => {
                    match devices.iter_mut().find(|d| d.0 == id) {
                        Some(d) => d.1 = spec,
                        None => devices.push((id, spec)),
                    }
                    Ok(Response::Done)
                }
                Command::Stop => {
                    let _ = reply.send(Ok(Response::Done));
                    return Err(PreBootError::Stopped);
                }
                Command::InstanceStart => match Vm::new(config(&devices)) {
                    Ok(vm) => {
                        let running = RunningVm::launch(vm, None, self.tx, self.rx, self.notify)
                            .map_err(PreBootError::Start);
                        let _ = reply.send(match &running {
                            Ok(_) => Ok(Response::Done),
                            Err(_) => Err(ControlError::Gone),
                        });
                        return running;
                    }
                    Err(e) => Err(ControlError::Boot(e)),
                },
                _ => Err(ControlError::NotStarted),
            };
            let _ = reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_get_names_and_take_their_bus_order() {
        let ids = default_ids(&[
            VirtioSpec::Rng,
            VirtioSpec::Block {
                path: "a".into(),
                read_only: false,
                direct: false,
            },
            VirtioSpec::Block {
                path: "b".into(),
                read_only: true,
                direct: false,
            },
        ]);
        let names: Vec<&str> = ids.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(names, ["entropy", "drive0", "drive1"]);
        let mut v: Vec<VirtioSpec> = ids.into_iter().map(|d| d.1).collect();
        v.sort_by_key(bus_order);
        assert_eq!(v.last(), Some(&VirtioSpec::Rng));
    }
}
