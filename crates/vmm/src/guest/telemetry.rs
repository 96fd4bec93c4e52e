//! What the controller learns from the built-in guest's events: heartbeats and their gaps,
//! checksums, exit codes, reported values.

use serde::Serialize;

use super::Event;

/// Per-vCPU results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VcpuSummary {
    /// vCPU.
    pub vcpu: u32,
    /// Heartbeats after the first (number 0).
    pub heartbeats: u32,
    /// Longest gap between consecutive heartbeats numbered 1 and up, µs.
    pub max_gap_us: u64,
    /// Checksum reported by the guest (`0x` hex in JSON).
    #[serde(with = "crate::hex::opt")]
    pub checksum: Option<u64>,
    /// Exit code, if the workload finished.
    pub exit_code: Option<u32>,
    /// Host time of `Ready`, µs.
    pub ready_us: Option<u64>,
    /// Host time of `Done`, µs.
    pub done_us: Option<u64>,
}

/// The guest's record so far.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// Per vCPU.
    pub vcpus: Vec<VcpuSummary>,
    /// Host time of each vCPU's last heartbeat numbered 1 or later, µs.
    pub last_hb_us: Vec<Option<u64>>,
    /// Host time of the first heartbeat of any vCPU, µs.
    pub first_hb_us: Option<u64>,
    /// Last heartbeat number per vCPU (carried over from a snapshot or a migration).
    pub last_n: Vec<u32>,
    /// Values the guest reported: (key, value), in order.
    pub reports: Vec<(u32, u32)>,
}

impl Telemetry {
    /// A record for `vcpus` vCPUs whose heartbeats were last numbered `last_n`.
    pub fn new(vcpus: usize, last_n: Vec<u32>) -> Telemetry {
        Telemetry {
            vcpus: (0..vcpus)
                .map(|i| VcpuSummary {
                    vcpu: i as u32,
                    ..Default::default()
                })
                .collect(),
            last_hb_us: vec![None; vcpus],
            first_hb_us: None,
            last_n,
            reports: Vec::new(),
        }
    }

    /// Take `e` into account. Returns whether the guest asked for a reset.
    pub fn absorb(&mut self, e: &Event) -> bool {
        match *e {
            Event::Heartbeat { vcpu, n, t_us } => {
                let i = vcpu as usize;
                self.first_hb_us.get_or_insert(t_us);
                if let Some(l) = self.last_n.get_mut(i) {
                    *l = n;
                }
                if let Some(s) = self.vcpus.get_mut(i)
                    && n >= 1
                {
                    s.heartbeats += 1;
                    if let Some(prev) = self.last_hb_us[i] {
                        s.max_gap_us = s.max_gap_us.max(t_us.saturating_sub(prev));
                    }
                    self.last_hb_us[i] = Some(t_us);
                }
            }
            Event::Ready { vcpu, t_us } => {
                if let Some(s) = self.vcpus.get_mut(vcpu as usize) {
                    s.ready_us = Some(t_us);
                }
            }
            Event::Checksum { vcpu, value } => {
                if let Some(s) = self.vcpus.get_mut(vcpu as usize) {
                    s.checksum = Some(value);
                }
            }
            Event::Done { vcpu, code, t_us } => {
                if let Some(s) = self.vcpus.get_mut(vcpu as usize) {
                    s.exit_code = Some(code);
                    s.done_us = Some(t_us);
                }
            }
            Event::Log { .. } => {}
            Event::Value { key, value, .. } => self.reports.push((key, value)),
            Event::Reset { .. } => return true,
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_gaps_and_values() {
        let mut t = Telemetry::new(2, vec![7, 0]);
        let hb = |vcpu, n, t_us| Event::Heartbeat { vcpu, n, t_us };
        for e in [hb(0, 8, 100), hb(0, 9, 250), hb(0, 10, 300), hb(1, 0, 50)] {
            assert!(!t.absorb(&e));
        }
        assert_eq!(t.first_hb_us, Some(100));
        assert_eq!(t.vcpus[0].heartbeats, 3);
        assert_eq!(t.vcpus[0].max_gap_us, 150);
        assert_eq!(t.vcpus[1].heartbeats, 0);
        assert_eq!(t.last_n, vec![10, 0]);
        t.absorb(&Event::Checksum { vcpu: 1, value: 5 });
        t.absorb(&Event::Value {
            vcpu: 0,
            key: 1,
            value: 2,
        });
        assert_eq!(t.vcpus[1].checksum, Some(5));
        assert_eq!(t.reports, vec![(1, 2)]);
        // Out-of-range vCPU numbers from a confused guest are ignored, never a panic.
        assert!(!t.absorb(&hb(9, 1, 1)));
        assert!(t.absorb(&Event::Reset { vcpu: 0, t_us: 1 }));
    }
}
