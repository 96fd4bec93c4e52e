//! The snapshot directory's files, as `restore` and the page handler read them.

use std::path::Path;

use vmm::snapshot::{MAX_PAGES, MemoryIndex, WorkingSet, parse_manifest, state};

/// `manifest.json`: parsed and checked; what parses survives encode and parse.
pub fn manifest(data: &[u8]) -> bool {
    let path = Path::new("manifest.json");
    let Ok(m) = parse_manifest(data, path) else {
        return false;
    };
    let e = serde_json::to_vec(&m).expect("a parsed manifest encodes");
    let again = parse_manifest(&e, path).expect("its own encoding parses");
    assert_eq!(
        serde_json::to_vec(&again).expect("encodes"),
        e,
        "manifest round trip"
    );
    true
}

/// `memory.idx` (and, with the same bytes, the `working-set` file for an index of the same
/// size): decoded; what decodes survives encode and decode.
pub fn index(data: &[u8]) -> bool {
    let pages = MAX_PAGES.min(1 << 20);
    let _ = WorkingSet::decode(data, pages).map(|ws| {
        let again = WorkingSet::decode(&ws.encode(), pages).expect("own working set decodes");
        assert_eq!(again.pages, ws.pages, "working set round trip");
    });
    let Ok(ix) = MemoryIndex::decode(data) else {
        return false;
    };
    let again = MemoryIndex::decode(&ix.encode()).expect("its own encoding decodes");
    assert_eq!(again, ix, "index round trip");
    assert_eq!(ix.chunk_crc.len() as u64, ix.chunks(), "a CRC per chunk");
    for p in [0, ix.pages.saturating_sub(1), ix.pages, u64::MAX] {
        let _ = ix.nonzero(p);
    }
    true
}

/// `state.bin` (also a migration's `State` frame): the first byte picks the vCPU count the
/// manifest would give (1..=4); what decodes re-encodes to a fixed point.
pub fn state(data: &[u8]) -> bool {
    let [n, rest @ ..] = data else {
        return false;
    };
    let vcpus = 1 + usize::from(n % 4);
    let Ok((vm, cpus)) = state::decode(rest, vcpus) else {
        return false;
    };
    assert_eq!(cpus.len(), vcpus, "one state per vCPU");
    let e = state::encode(&vm, &cpus);
    let (vm2, cpus2) = state::decode(&e, vcpus).expect("its own encoding decodes");
    assert_eq!(state::encode(&vm2, &cpus2), e, "state round trip");
    true
}

/// A device's record inside `state.bin` (tags 30, 31 and 32): the first byte picks the
/// format modulo 3: 0 a virtio device's (`virtio::decode`), 1 COM1's
/// (`vmm::devices::SerialRecord`), 2 a vfio-user device's (`vmm::devices::pci::PciRecord`);
/// what decodes re-encodes to the same bytes.
pub fn device_record(data: &[u8]) -> bool {
    let [k, rest @ ..] = data else {
        return false;
    };
    match k % 3 {
        0 => {
            let Ok((t, dev)) = virtio::decode(rest) else {
                return false;
            };
            assert_eq!(virtio::encode(&t, &dev), rest, "virtio record round trip");
        }
        1 => {
            use vmm::devices::SerialRecord;
            let Ok(s) = SerialRecord::decode(rest) else {
                return false;
            };
            assert_eq!(SerialRecord::encode(&s), rest, "serial record round trip");
        }
        _ => {
            use vmm::devices::pci::PciRecord;
            let Ok(r) = PciRecord::decode(rest) else {
                return false;
            };
            assert_eq!(r.encode(), rest, "vfio-user record round trip");
        }
    }
    true
}
