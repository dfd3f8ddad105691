//! `meshsync demo`: the foundation at work on one machine, step by step.
//!
//! Two devices are created in temporary homes (real key files), one creates a mesh and admits
//! the other, the mesh key travels wrapped with HPKE, a sample folder's files are recorded as
//! signed index entries, and the index changes travel as bytes to the other device, which
//! checks every signature before taking them. Then the safety nets: a concurrent edit becomes
//! a conflict on both sides, a stranger's record is refused, and the storage peer's sealed form
//! of a change shows no names. The network between the devices arrives with the transport; here
//! the bytes are handed over in memory.

use std::path::Path;

use anyhow::Context;
use meshsync_crdt::index::{encode_changes, FileUpdate};
use meshsync_crdt::{
    Action, ChunkListHash, Epoch, FileKind, FolderId, FolderIndex, MembershipLog, MeshKey, Role,
    SealedChange,
};

use crate::home::Home;

/// Runs the demo in `dir` (a fresh temporary directory unless given).
pub fn run(dir: Option<&Path>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => tempfile_dir()?,
    };
    step("Two devices, each with its own keys (mode 0600)");
    let laptop_home = Home::locate(Some(dir.join("laptop")))?;
    let desktop_home = Home::locate(Some(dir.join("desktop")))?;
    let laptop = laptop_home.init("laptop", Role::Device)?;
    let desktop = desktop_home.init("desktop", Role::Device)?;
    println!(
        "  laptop   {}  ({})",
        laptop.device_id(),
        laptop_home.path().display()
    );
    println!(
        "  desktop  {}  ({})",
        desktop.device_id(),
        desktop_home.path().display()
    );

    step("The laptop creates a mesh and admits the desktop, wrapping the mesh key to it");
    let epoch0 = MeshKey::generate(Epoch(0));
    let (mut laptop_log, mesh) = MembershipLog::create(&laptop, "laptop", &epoch0);
    let wrapped = epoch0.wrap_for(&mesh, &desktop.device_id(), &desktop.kem_public())?;
    laptop_log.append(
        &laptop,
        Action::Add {
            device: desktop.device_id(),
            role: Role::Device,
            name: "desktop".into(),
            kem: Some(desktop.kem_public()),
            wrapped: Some(wrapped),
        },
    )?;
    let membership_bytes = laptop_log.changes_since(&[]);
    let mut desktop_log = MembershipLog::empty(mesh);
    desktop_log.apply(&membership_bytes)?;
    let key = desktop_log
        .view()
        .wraps_for(&desktop.device_id())
        .first()
        .context("the desktop's wrapped key is in the log")?
        .unwrap_with(&mesh, &desktop)?;
    println!(
        "  mesh {mesh}: {} members, epoch {}",
        desktop_log.view().members.len(),
        key.epoch()
    );
    println!(
        "  the desktop verified {} signed membership entries and unwrapped the epoch-0 key",
        desktop_log.len()
    );

    step("The laptop records a sample folder as signed index entries");
    let sample = dir.join("laptop-folder");
    write_sample(&sample)?;
    let folder = FolderId::new("sample")?;
    let mut laptop_index = FolderIndex::new(mesh, folder.clone());
    let updates = scan(&sample)?;
    let count = updates.len();
    laptop_index.write(&laptop, Epoch(0), updates)?;
    let changes = laptop_index.take_local_changes();
    let wire: usize = changes.iter().map(|c| c.change.len()).sum();
    println!(
        "  {count} paths signed; {} shard changes, {wire} bytes",
        changes.len()
    );

    step("The desktop checks every signature, then takes the changes");
    let mut desktop_index = FolderIndex::new(mesh, folder.clone());
    let report = desktop_index.apply(desktop_log.view(), changes.clone())?;
    let mut paths: Vec<_> = desktop_index
        .iter()
        .map(|(p, s)| (p, s.winner.size))
        .collect();
    paths.sort();
    for (path, size) in &paths {
        println!("  {path:<28} {size:>6} bytes");
    }
    println!("  {} paths admitted", report.paths.len());

    step("Both edit notes.txt at once: both versions survive, on both sides");
    laptop_index.write(&laptop, Epoch(0), vec![edit("notes.txt", b"laptop's edit")])?;
    desktop_index.write(
        &desktop,
        Epoch(0),
        vec![edit("notes.txt", b"desktop's edit!")],
    )?;
    let to_desktop = laptop_index.take_local_changes();
    let to_laptop = desktop_index.take_local_changes();
    desktop_index.apply(desktop_log.view(), to_desktop)?;
    laptop_index.apply(laptop_log.view(), to_laptop)?;
    for (name, index) in [("laptop", &laptop_index), ("desktop", &desktop_index)] {
        let state = index.get("notes.txt").context("notes.txt is indexed")?;
        let loser = state
            .losers
            .first()
            .context("the concurrent edit is kept")?;
        println!(
            "  {name:<8} winner {} bytes by {}; kept as conflict copy: {} bytes by {}",
            state.winner.size,
            state.winner.author.short(),
            loser.size,
            loser.author.short()
        );
    }

    step("A stranger's record is refused before it touches anything");
    let stranger = meshsync_crdt::DeviceKeys::generate();
    let mut stranger_index = FolderIndex::new(mesh, folder.clone());
    stranger_index.write(&stranger, Epoch(0), vec![edit("notes.txt", b"pwned")])?;
    match desktop_index.apply(desktop_log.view(), stranger_index.take_local_changes()) {
        Err(error) => println!("  refused: {error}"),
        Ok(_) => anyhow::bail!("a stranger's record was admitted"),
    }

    step("What a storage peer would hold: sealed, padded, signed");
    let plaintext = encode_changes(&folder, &changes);
    let sealed = SealedChange::seal(mesh, &key, &desktop, &plaintext).encode();
    let leaks = ["notes.txt", "photos", "report.md"]
        .iter()
        .filter(|name| sealed.windows(name.len()).any(|w| w == name.as_bytes()))
        .count();
    println!(
        "  {} bytes of index changes -> {} sealed bytes; file names found in them: {leaks}",
        plaintext.len(),
        sealed.len()
    );

    println!(
        "\nDone. The homes and the sample folder are in {} (look at keys/ and config.toml).",
        dir.display()
    );
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshsync-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn write_sample(root: &Path) -> anyhow::Result<()> {
    let files: [(&str, &[u8]); 4] = [
        ("notes.txt", b"things to sync\n"),
        ("report.md", b"# Quarterly report\nAll good.\n"),
        ("photos/cat.jpg", &[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 4]),
        ("photos/2026/beach.jpg", &[0xff, 0xd8, 0xff, 0xe0, 9, 9, 9]),
    ];
    for (path, content) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap_or(root))?;
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Walks `root` and describes each file as an update. (The real scanner, with chunking and a
/// chunk store, comes with the sync engine; here the chunk-list hash is the content's hash.)
fn scan(root: &Path) -> anyhow::Result<Vec<FileUpdate>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            let meta = entry.metadata()?;
            let rel = path
                .strip_prefix(root)?
                .to_str()
                .context("non-UTF-8 file name")?
                .to_string();
            if meta.is_dir() {
                stack.push(path.clone());
                out.push(FileUpdate {
                    path: rel,
                    kind: FileKind::Directory,
                    size: 0,
                    mode: 0o755,
                    mtime_ns: 0,
                    deleted: false,
                    chunks: ChunkListHash::default(),
                });
            } else {
                let content = std::fs::read(&path)?;
                out.push(edit(&rel, &content));
            }
        }
    }
    Ok(out)
}

fn edit(path: &str, content: &[u8]) -> FileUpdate {
    FileUpdate {
        path: path.to_string(),
        kind: FileKind::File,
        size: content.len() as u64,
        mode: 0o644,
        mtime_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
        deleted: false,
        chunks: ChunkListHash(*blake3::hash(content).as_bytes()),
    }
}
