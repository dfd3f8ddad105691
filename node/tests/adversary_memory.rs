//! A member whose keys are stolen (see `common/mallory.rs`) tries to exhaust a real device:
//! decompression and operation-count bombs (membership and index), 100,000 junk membership
//! entries signed by fresh keys, and a pull naming one folder a million times. Each is refused
//! or costs what one honest request costs: the process's peak memory while they arrive stays
//! far below what any of them would take if opened, and the device then syncs on. Alone in its
//! own test binary, so the peak measured is this test's.

mod common;

use std::collections::BTreeMap;
use std::io::Write;

use automerge::transaction::Transactable;
use common::mallory::{mesh, Mallory};
use meshsync_crdt::index::ShardChange;
use meshsync_crdt::{Action, DeviceKeys, MembershipLog};
use meshsync_node::protocol::{SyncChanges, SyncReply, SyncRequest};

/// What one Automerge chunk that claims to be a compressed change looks like: magic, checksum,
/// type 2, length, and a deflate stream of `inflated` zero bytes.
fn deflate_bomb(inflated: usize) -> Vec<u8> {
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..inflated >> 20 {
        encoder.write_all(&zeros).unwrap();
    }
    let body = encoder.finish().unwrap();
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    let mut len = body.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            chunk.push(byte);
            break;
        }
        chunk.push(byte | 0x80);
    }
    chunk.extend(body);
    chunk
}

/// A plain change of `ops` operations (one text splice): run-length encoding keeps it small.
fn op_bomb(ops: usize) -> Vec<u8> {
    let mut doc = automerge::AutoCommit::new();
    let text = doc
        .put_object(automerge::ROOT, "t", automerge::ObjType::Text)
        .unwrap();
    doc.splice_text(&text, 0, 0, &"a".repeat(ops)).unwrap();
    doc.commit();
    let change = doc.get_changes(&[]).into_iter().next().unwrap().clone();
    change.raw_bytes().to_vec()
}

/// (resident now, peak since the last reset) in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the process's peak resident size to what it holds now.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_and_floods_are_refused_within_bounded_memory() {
    let mesh = mesh().await;
    let mallory = Mallory::new(&mesh.m, &mesh.v, &mesh.folder).await;

    let started = std::time::Instant::now();
    // Everything is built first, so the peak measured below is the victim's doing.
    let bomb = deflate_bomb(768 << 20);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let ops = op_bomb(300_000);
    assert!(ops.len() < 1 << 20, "{} bytes", ops.len());
    let mesh_id = mallory.log.mesh();
    let junk: Vec<Vec<u8>> = (0..100_000)
        .flat_map(|_| {
            let stranger = DeviceKeys::generate();
            let action = Action::SetAdmin {
                device: stranger.device_id(),
                admin: true,
            };
            let mut log = MembershipLog::empty(mesh_id);
            log.append_unchecked(&stranger, action);
            log.changes_since(&[])
        })
        .collect();
    assert_eq!(junk.len(), 100_000);
    let pull = SyncRequest::Pull {
        membership: Vec::new(),
        folders: vec![(mesh.folder.clone(), BTreeMap::new()); 1_000_000],
    };

    println!("built in {:.1?}", started.elapsed());
    let (before, _) = memory();
    reset_peak();
    for change in [bomb.clone(), ops.clone()] {
        let index = vec![ShardChange {
            shard: 0,
            change: change.clone(),
            signature: meshsync_crdt::Signature::from_bytes(&[0; 64]),
        }];
        let reply = mallory.push(index).await;
        assert!(matches!(reply, SyncReply::Ok), "{reply:?}");
        let membership = SyncChanges {
            membership: vec![change],
            ..SyncChanges::default()
        };
        let reply = mallory.request(&SyncRequest::Push(membership)).await;
        assert!(matches!(reply, SyncReply::Refused(_)), "{reply:?}");
    }
    for piece in junk.chunks(10_000) {
        let push = SyncChanges {
            membership: piece.to_vec(),
            ..SyncChanges::default()
        };
        let reply = mallory.request(&SyncRequest::Push(push)).await;
        assert!(matches!(reply, SyncReply::Refused(_)), "{reply:?}");
    }
    let SyncReply::Changes(answer) = mallory.request(&pull).await else {
        panic!("a pull is answered");
    };
    assert_eq!(answer.folders.len(), 1, "one answer per folder");
    let (after, peak) = memory();
    println!("sent and answered in {:.1?}", started.elapsed());
    println!(
        "resident before {} MiB, after {} MiB, peak while attacked {} MiB",
        before / MIB,
        after / MIB,
        peak / MIB
    );
    assert!(
        peak < before + 200 * MIB,
        "peak {} MiB against {} MiB before",
        peak / MIB,
        before / MIB
    );

    // None of it counted: the membership is the three devices, and the folder syncs on.
    let members = mesh.v.lock().await.log().view().members.len();
    assert_eq!(members, 3);
    mesh.still_syncs().await;
}
