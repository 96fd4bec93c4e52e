//! The microVM on real KVM: every workload on 1 and 2 vCPUs with checksums checked against a
//! host model, pause/resume, and the failures that must be clear errors.
//! Needs /dev/kvm (root on CI); without it every test fails with the KVM error.

use std::time::{Duration, Instant};

use vmm::guest::{self, abi};
use vmm::{Backend, Event, RunError, RunSummary, Vm, VmConfig, VmError, Workload};

const MIB: u64 = 1 << 20;

fn cfg(workload: Workload, vcpus: u32) -> VmConfig {
    VmConfig {
        mem_bytes: 36 * MIB,
        vcpus,
        workload,
        workload_bytes: Some(32 * MIB),
        ..VmConfig::default()
    }
}

fn run(c: VmConfig) -> (RunSummary, Vec<Event>) {
    let vm = Vm::new(c).unwrap_or_else(|e| panic!("{}", uffd::error_chain(&e)));
    let mut events = Vec::new();
    let s = vm
        .start()
        .unwrap()
        .wait(Duration::from_secs(60), |e| events.push(e.clone()))
        .unwrap_or_else(|e| panic!("{}", uffd::error_chain(&e)));
    (s, events)
}

#[test]
fn fill_matches_the_memload_pattern_on_1_and_2_vcpus() {
    for vcpus in [1, 2] {
        let (s, _) = run(cfg(Workload::Fill, vcpus));
        assert!(s.checksums_verified);
        let per = 32 * MIB / u64::from(vcpus);
        for (i, v) in s.vcpus.iter().enumerate() {
            let model = guest::fill_model(i as u64 * per / 4096, per as usize);
            assert_eq!(v.checksum, Some(abi::checksum_bytes(&model)));
            assert_eq!(v.exit_code, Some(0));
        }
    }
}

#[test]
fn random_matches_the_host_model_on_1_and_2_vcpus() {
    for vcpus in [1, 2] {
        let mut c = cfg(Workload::Random, vcpus);
        c.seed = 42;
        let (s, _) = run(c);
        let per = (32 * MIB / u64::from(vcpus)) as usize;
        for (i, v) in s.vcpus.iter().enumerate() {
            let model = guest::random_model(42 + i as u64, per);
            assert_eq!(v.checksum, Some(abi::checksum_bytes(&model)));
        }
    }
}

#[test]
fn verify_of_untouched_memory_is_the_checksum_of_zeros() {
    for vcpus in [1, 2] {
        let (s, _) = run(cfg(Workload::Verify, vcpus));
        let per = (32 * MIB / u64::from(vcpus)) as usize;
        let zeros = abi::checksum_bytes(&vec![0; per]);
        for v in &s.vcpus {
            assert_eq!(v.checksum, Some(zeros));
        }
    }
}

#[test]
fn dirty_and_read_beat_every_100ms_and_stop_on_time() {
    for w in [Workload::Dirty, Workload::Read] {
        for vcpus in [1, 2] {
            let mut c = cfg(w, vcpus);
            // Long enough for 4 beats after a fill that is slow on a loaded machine.
            c.run_for = Some(Duration::from_millis(1500));
            c.backend = Backend::Memfd;
            let (s, events) = run(c);
            assert!(s.checksums_verified, "{w}: {s:?}");
            for v in &s.vcpus {
                assert!(v.heartbeats >= 4, "{w}: {v:?}");
                // A heartbeat every 100 ms: gaps near 100 ms, none wildly late.
                assert!(
                    v.max_gap_us >= 95_000 && v.max_gap_us < 400_000,
                    "{w}: {v:?}"
                );
                assert!(v.ready_us.is_some());
            }
            let n: usize = events
                .iter()
                .filter(|e| matches!(e, Event::Heartbeat { n: 0, .. }))
                .count();
            assert_eq!(n, vcpus as usize, "heartbeat 0 at each vCPU's entry");
        }
    }
}

#[test]
fn dirty_rewrites_words_on_top_of_the_fill() {
    let mut c = cfg(Workload::Dirty, 1);
    c.run_for = Some(Duration::from_millis(300));
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    vm.start()
        .unwrap()
        .wait(Duration::from_secs(30), |_| {})
        .unwrap();
    // Every word is fill + (number of passes that touched it): the sum of differences counts
    // the touches, at least one full pass.
    let bytes = mem.read(0x40_0000, (32 * MIB) as usize).unwrap();
    let model = guest::fill_model(0, bytes.len());
    let touches: u64 = bytes
        .chunks_exact(8)
        .zip(model.chunks_exact(8))
        .map(|(a, b)| {
            u64::from_le_bytes(a.try_into().unwrap())
                .wrapping_sub(u64::from_le_bytes(b.try_into().unwrap()))
        })
        .fold(0u64, u64::wrapping_add);
    assert!(touches >= 32 * MIB / 4096, "{touches} touches");
}

#[test]
fn pause_and_resume_stop_the_heartbeats() {
    let mut c = cfg(Workload::Dirty, 2);
    c.run_for = Some(Duration::from_millis(1500));
    let running = Vm::new(c).unwrap().start().unwrap();
    // Pause once every vCPU beats (filling its slice is slow on a loaded machine): the pause
    // must fall between heartbeats to show as a gap.
    let t = Instant::now();
    while running
        .machine()
        .control()
        .cpus
        .iter()
        .any(|c| c.first_hb_ns.load(std::sync::atomic::Ordering::SeqCst) == 0)
    {
        assert!(t.elapsed() < Duration::from_secs(30), "no heartbeats");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    running.pause();
    let paused_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    running.resume();
    let paused_for = paused_at.elapsed();
    let s = running.wait(Duration::from_secs(30), |_| {}).unwrap();
    for v in &s.vcpus {
        // The pause shows as one long gap between heartbeats.
        assert!(
            v.max_gap_us >= 450_000 && v.max_gap_us < paused_for.as_micros() as u64 + 250_000,
            "{v:?}"
        );
    }
}

#[test]
fn a_guest_exception_is_a_clear_error_naming_vcpu_exit_and_rip() {
    let vm = Vm::new(cfg(Workload::Fill, 1)).unwrap();
    // Replace the fill workload's first instruction with ud2.
    let entry = 0x10_0000 + guest::entry_offset(Workload::Fill.index());
    vm.memory().write(entry, &[0x0f, 0x0b]).unwrap();
    let err = vm
        .start()
        .unwrap()
        .wait(Duration::from_secs(30), |_| {})
        .unwrap_err();
    match &err {
        RunError::Vm(VmError::Exit { vcpu: 0, exit, rip }) => {
            assert!(exit.contains("SHUTDOWN"), "{err}");
            assert_eq!(*rip & !0xfff, entry & !0xfff, "{err}");
        }
        _ => panic!("unexpected error {err}"),
    }
}

#[test]
fn a_corrupted_guest_memory_is_caught_by_the_checksum() {
    // The guest reports the checksum of its slice; if memory changes under it after the
    // checksum (a broken restore, a lying page source), the host's reading disagrees.
    let vm = Vm::new(cfg(Workload::Verify, 1)).unwrap();
    let mem = vm.memory().clone();
    let running = vm.start().unwrap();
    let mut corrupted = false;
    let r = running.wait(Duration::from_secs(30), |e| {
        if let Event::Checksum { .. } = e {
            mem.write(0x40_0000 + 4096 * 7, &[1]).unwrap();
            corrupted = true;
        }
    });
    assert!(corrupted);
    assert!(
        matches!(r, Err(RunError::Checksum { vcpu: 0, .. })),
        "{r:?}"
    );
}

#[test]
fn bad_configurations_are_refused() {
    let cases = [
        VmConfig {
            vcpus: 0,
            ..cfg(Workload::Fill, 1)
        },
        VmConfig {
            mem_bytes: 3 * MIB,
            ..cfg(Workload::Fill, 1)
        },
        VmConfig {
            mem_bytes: 37 * MIB,
            ..cfg(Workload::Fill, 1)
        },
        VmConfig {
            workload_bytes: Some(64 * MIB),
            ..cfg(Workload::Fill, 1)
        },
        VmConfig {
            mem_bytes: 1 << 50,
            ..cfg(Workload::Fill, 1)
        },
        VmConfig {
            workload_bytes: Some(MIB),
            ..cfg(Workload::Fill, 4)
        },
    ];
    for c in cases {
        let e = Vm::new(c.clone())
            .err()
            .unwrap_or_else(|| panic!("accepted {c:?}"));
        let msg = uffd::error_chain(&e);
        assert!(
            matches!(e, VmError::Config(_) | VmError::Memory(_)),
            "{c:?}: {msg}"
        );
    }
}

#[test]
fn huge_page_backend_runs_or_says_why_not() {
    // Root on CI: reserve huge pages for this test, then put the old value back.
    let knob = "/proc/sys/vm/nr_hugepages";
    let old = std::fs::read_to_string(knob).unwrap();
    let set = |n: &str| std::fs::write(knob, n).expect("root may set nr_hugepages");
    let c = VmConfig {
        backend: Backend::HugePages,
        ..cfg(Workload::Fill, 2)
    };
    set("0");
    let e = Vm::new(c.clone()).expect_err("no huge pages: refused");
    assert!(
        uffd::error_chain(&e).contains("nr_hugepages"),
        "{}",
        uffd::error_chain(&e)
    );
    set("24");
    let r = std::panic::catch_unwind(|| run(c));
    set(old.trim());
    let (s, _) = r.unwrap();
    assert!(s.checksums_verified);
}
