//! The controller on real KVM: typed commands answered while the guest runs, pause owners,
//! long work off the control loop, refusals by name, and the irqchip through two snapshots.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::controller::{Command, ControlError, ControlHandle, Response, RunState};
use vmm::restore::{AfterRestore, RestoreMode, RestoreOptions};
use vmm::vstate::PauseOwner;
use vmm::{Event, RunningVm, Vm, VmConfig, Workload};

const QUICK: Option<Duration> = Some(Duration::from_secs(10));

fn dirty(mem_mib: u64, vcpus: u32) -> VmConfig {
    VmConfig {
        mem_bytes: mem_mib << 20,
        vcpus,
        workload: Workload::Dirty,
        workload_bytes: Some(16 << 20),
        ..VmConfig::default()
    }
}

/// Run the controller until every vCPU has beaten once.
fn until_heartbeats(running: &mut RunningVm, vcpus: u32) {
    let mut seen = std::collections::HashSet::new();
    let t = Instant::now();
    while seen.len() < vcpus as usize {
        assert!(t.elapsed() < Duration::from_secs(60), "no heartbeats");
        if let Some(Event::Heartbeat { vcpu, n, .. }) =
            running.next_event(Duration::from_secs(1)).unwrap()
            && n >= 1
        {
            seen.insert(vcpu);
        }
    }
}

/// Run `f` against the controller from another thread while this one runs the VM; then stop.
fn with_controller<T: Send + 'static>(
    cfg: VmConfig,
    f: impl FnOnce(ControlHandle, Arc<vmm::vstate::Machine>) -> T + Send + 'static,
) -> (T, vmm::RunSummary) {
    let vcpus = cfg.vcpus;
    let mut running = Vm::new(cfg).unwrap().start().unwrap();
    until_heartbeats(&mut running, vcpus);
    let h = running.api_sender();
    let m = running.machine().clone();
    let t = std::thread::spawn(move || {
        let r = f(h.clone(), m);
        assert!(matches!(h.ask(Command::Stop, QUICK), Ok(Response::Done)));
        r
    });
    let s = running.wait(Duration::from_secs(120), |_| {}).unwrap();
    (t.join().unwrap(), s)
}

#[test]
fn the_controller_answers_typed_commands() {
    let (_, s) = with_controller(dirty(36, 2), |h, _| {
        let Ok(Response::Vm(v)) = h.ask(Command::GetVm, QUICK) else {
            panic!("GetVm")
        };
        assert_eq!(v.state, RunState::Running);
        assert_eq!(v.config.vcpus, 2);
        assert!(matches!(h.ask(Command::Pause, QUICK), Ok(Response::Done)));
        let Ok(Response::Vm(v)) = h.ask(Command::GetVm, QUICK) else {
            panic!("GetVm")
        };
        assert_eq!(v.state, RunState::Paused);
        assert_eq!(v.paused_by, vec![PauseOwner::Operator]);
        let Ok(Response::Stats(a)) = h.ask(Command::Stats, QUICK) else {
            panic!("Stats")
        };
        std::thread::sleep(Duration::from_millis(300));
        let Ok(Response::Stats(b)) = h.ask(Command::Stats, QUICK) else {
            panic!("Stats")
        };
        assert!(a.paused && b.paused);
        let beats = |s: &vmm::controller::VmStats| -> Vec<u32> {
            s.vcpus.iter().map(|v| v.heartbeats).collect()
        };
        assert_eq!(beats(&a), beats(&b), "no heartbeat while paused");
        assert!(matches!(h.ask(Command::Resume, QUICK), Ok(Response::Done)));
        // Every vCPU beats again after the resume: the pause falls between two beats.
        let t = Instant::now();
        loop {
            let Ok(Response::Stats(c)) = h.ask(Command::Stats, QUICK) else {
                panic!("Stats")
            };
            if beats(&c)
                .iter()
                .zip(beats(&b))
                .all(|(now, then)| *now > then)
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no beat after resume"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(matches!(
            h.ask(Command::MigrateStatus, QUICK),
            Err(ControlError::NoMigration)
        ));
    });
    assert!(s.stopped);
    assert!(
        s.vcpus.iter().all(|v| v.max_gap_us >= 250_000),
        "the pause is a gap: {:?}",
        s.vcpus
    );
}

#[test]
fn an_operator_resume_does_not_release_another_owners_pause() {
    with_controller(dirty(36, 1), |h, m| {
        let control = m.control();
        // A migration's switchover holds its own pause.
        control.pause(PauseOwner::Migration);
        match h.ask(Command::Resume, QUICK) {
            Err(ControlError::StillPaused(by)) => assert_eq!(by, vec![PauseOwner::Migration]),
            other => panic!("an operator resume during switchover: {other:?}"),
        }
        assert!(control.is_paused());
        let hb = control.cpus[0]
            .last_n
            .load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            control.cpus[0]
                .last_n
                .load(std::sync::atomic::Ordering::SeqCst),
            hb,
            "the guest ran during the switchover"
        );
        // An operator's pause outlives a snapshot's.
        assert!(matches!(h.ask(Command::Pause, QUICK), Ok(Response::Done)));
        control.resume(PauseOwner::Migration);
        assert!(control.is_paused());
        assert!(matches!(h.ask(Command::Resume, QUICK), Ok(Response::Done)));
        assert!(!control.is_paused());
    });
}

#[test]
fn get_vm_is_answered_at_once_while_a_large_snapshot_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("snap");
    let cfg = VmConfig {
        workload_bytes: Some(768 << 20),
        ..dirty(1024, 1)
    };
    let ((worst, during, info), _) = with_controller(cfg, move |h, _| {
        let snap = {
            let h = h.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                h.ask(
                    Command::SnapshotCreate {
                        dir: out,
                        page_checksums: true,
                    },
                    None,
                )
            })
        };
        let (mut worst, mut during) = (Duration::ZERO, 0);
        while !snap.is_finished() {
            let t = Instant::now();
            let r = h.ask(Command::GetVm, QUICK);
            let took = t.elapsed();
            if let Ok(Response::Vm(v)) = &r
                && v.paused_by.contains(&PauseOwner::Snapshot)
            {
                during += 1;
                worst = worst.max(took);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (worst, during, snap.join().unwrap())
    });
    let Ok(Response::Snapshot(info)) = info else {
        panic!("the snapshot's own answer: {info:?}")
    };
    assert!(info.total_ms > 0.0);
    assert!(during >= 3, "only {during} answers during the snapshot");
    assert!(
        worst < Duration::from_millis(100),
        "GET /vm took {worst:?} during a snapshot"
    );
}

#[test]
fn a_second_snapshot_of_a_restored_vm_keeps_the_irqchip_and_lapic() {
    if !vmm::vstate::kvm::has_irqchip() {
        panic!("this test needs KVM's in-kernel irqchip, which this host does not offer");
    }
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("1"), dir.path().join("2"));
    let cfg = VmConfig {
        irqchip: true,
        ..dirty(36, 2)
    };
    let mut running = Vm::new(cfg).unwrap().start().unwrap();
    until_heartbeats(&mut running, 2);
    running.snapshot(&first, false).unwrap();
    running.stop();
    let check = |d: &Path| {
        let l = vmm::snapshot::load(d).unwrap();
        assert!(l.manifest.irqchip, "{}: irqchip dropped", d.display());
        assert_eq!(l.vm.irqchips.len(), 3, "PIC master, slave and IOAPIC");
        for v in &l.vcpus {
            let lapic = v.lapic.as_ref().expect("LAPIC state");
            // The VMM software-enabled each LAPIC at creation (SVR bit 8).
            assert_eq!(lapic.regs[0xf1] & 1, 1, "LAPIC state is the VM's");
        }
        l.vm.irqchips[2]
    };
    let ioapic = check(&first);
    let r = vmm::restore::restore(
        &first,
        &RestoreOptions {
            mode: RestoreMode::Eager,
            then: AfterRestore::Resume,
            ..Default::default()
        },
    )
    .unwrap();
    let mut running = RunningVm::start_with(r.vm, r.pager).unwrap();
    until_heartbeats(&mut running, 2);
    assert!(running.machine().irqchip());
    running.snapshot(&second, false).unwrap();
    running.stop();
    let again = check(&second);
    use zerocopy::IntoBytes;
    assert_eq!(
        ioapic.as_bytes(),
        again.as_bytes(),
        "the IOAPIC came through"
    );
}

#[test]
fn a_vm_with_vfio_user_devices_is_snapshotted_with_their_state() {
    use vfu::devices::gpio;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("gpio.sock");
    let server = vfu::server::Server::new(false).unwrap();
    gpio::Gpio::description()
        .realize(gpio::Gpio::new(true))
        .unwrap()
        .attach(&server, &sock)
        .unwrap();
    let stop = server.shutdown_handle();
    let serving = std::thread::spawn(move || server.run());
    let cfg = VmConfig {
        vfio_user: vec![sock.clone()],
        ..dirty(36, 1)
    };
    let snap = dir.path().join("snap");
    let (outcome, _) = with_controller(cfg, move |h, _| {
        let s = h.ask(
            Command::SnapshotCreate {
                dir: snap.clone(),
                page_checksums: false,
            },
            QUICK,
        );
        (s, snap.exists())
    });
    // The device offers vfio-user migration: its state is in the snapshot.
    assert!(outcome.0.is_ok(), "snapshot: {:?}", outcome.0);
    assert!(outcome.1, "the snapshot was written");
    let (vm_state, _) = vmm::snapshot::state::decode(
        &std::fs::read(dir.path().join("snap/state.bin")).unwrap(),
        1,
    )
    .unwrap();
    assert_eq!(vm_state.devices.vfio_user.len(), 1);
    let rec = vmm::devices::pci::PciRecord::decode(&vm_state.devices.vfio_user[0]).unwrap();
    assert_eq!((rec.slot, rec.id), (1, vmm::guest::abi::PCI_ID_GPIO));
    assert!(rec.stream.starts_with(b"VFUS"), "the framework's stream");
    stop.shutdown();
    serving.join().unwrap().unwrap();
}

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(mib: u32) -> SmallDisk {
        let d = tempfile::tempdir().unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(d.path())
            .output()
            .expect("run mount(8)");
        assert!(
            o.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        SmallDisk(d)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_leaves_the_older_snapshot_whole_and_the_guest_running() {
    let disk = SmallDisk::new(24);
    let dir = disk.0.path().join("snap");
    let mut running = Vm::new(dirty(64, 1)).unwrap().start().unwrap();
    until_heartbeats(&mut running, 1);
    let first = running.snapshot(&dir, false).unwrap();
    assert!(first.bytes_written > 12 << 20, "{first:?}");
    // A second snapshot does not fit beside the first: it fails, and the first is untouched.
    let e = running.snapshot(&dir, false).unwrap_err();
    let chain = uffd::error_chain(&e);
    assert!(chain.contains("No space left on device"), "{chain}");
    let names: Vec<_> = std::fs::read_dir(disk.0.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("snap")],
        "no leftovers"
    );
    // The guest was resumed and runs on.
    assert!(!running.machine().control().is_paused());
    until_heartbeats(&mut running, 1);
    running.stop();
    // The first snapshot restores and its memory verifies.
    let r = vmm::restore::restore(
        &dir,
        &RestoreOptions {
            mode: RestoreMode::Eager,
            then: AfterRestore::Verify,
            ..Default::default()
        },
    )
    .unwrap();
    let want = r.checksums.clone();
    let s = RunningVm::start_with(r.vm, r.pager)
        .unwrap()
        .wait(Duration::from_secs(60), |_| {})
        .unwrap();
    assert_eq!(s.vcpus[0].checksum, Some(want[0]));
    assert_eq!(first.checksums, want);
}

#[test]
fn snapshots_never_write_through_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    let link = dir.path().join("snap");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut running = Vm::new(dirty(36, 1)).unwrap().start().unwrap();
    until_heartbeats(&mut running, 1);
    let e = running.snapshot(&link, false).unwrap_err();
    assert!(e.to_string().contains("is not a directory"), "{e}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    running.stop();
}
